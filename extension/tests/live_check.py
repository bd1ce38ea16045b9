"""Live check of comfy_bridge_tap against a real ComfyUI (not run by unittest).

Needs a running ComfyUI with ``comfy_bridge_tap`` and the ``bridge_probe`` nodes
(shared/comfyui/probe_nodes/) in its custom_nodes/, and aiohttp:

    python extension/tests/live_check.py [--url http://127.0.0.1:8188]

It connects a browser-like socket and a tap socket, then
  1. queues a probe workflow from the browser's client id,
  2. queues one with no client id,
  3. queues a Bus Ask workflow and answers it over POST /comfy_bridge/answer
     (then checks the second answer, a wrong secret and the Bus Publish message),
  4. lets one Bus Ask time out (on_timeout=error) and one fall back to its default,
  5. interrupts one during its wait (POST /interrupt),
and prints what each socket got plus a verdict per check. Exit status 1 when a
check failed.
"""

import argparse
import asyncio
import json
import random
import sys
import time
import uuid

import aiohttp

BROWSER_FLAGS = {"supports_preview_metadata": True, "supports_manager_v4_ui": True}
TAP_FLAGS = {"supports_preview_metadata": True, "comfy_bridge_tap": True}
SECRET_HEADER = "X-Comfy-Bridge-Secret"


def probe_workflow():
    """EmptyImage -> SleepProgress (3 steps, JPEG previews) -> Invert -> Save, + Preview."""
    seed = random.randrange(1 << 32)  # never cached
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 12536894}},
        "2": {
            "class_type": "BridgeProbeSleepProgress",
            "inputs": {
                "image": ["1", 0],
                "steps": 3,
                "step_seconds": 0.2,
                "preview": "JPEG",
                "preview_size": 32,
                "seed": seed,
            },
        },
        "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "bridge_tap_live/success"}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }


def ask_workflow(timeout, on_timeout="error", default="", subject="prompt"):
    """Bus Ask -> text of the answer, its JSON, and a Bus Publish with an image."""
    return {
        "1": {
            "class_type": "Bus Ask",
            "inputs": {
                "subject": subject,
                "payload": json.dumps({"question": "what should I draw?", "nonce": random.random()}),
                "timeout_seconds": timeout,
                "on_timeout": on_timeout,
                "default": default,
            },
        },
        "2": {"class_type": "BridgeProbeText", "inputs": {"text": ["1", 0]}},
        "3": {"class_type": "BridgeProbeText", "inputs": {"text": ["1", 1]}},
        "4": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 255}},
        "5": {"class_type": "Bus Publish", "inputs": {"subject": "live/check", "payload": ["1", 0], "image": ["4", 0]}},
    }


class Socket:
    def __init__(self, name, session, url, flags):
        self.name = name
        self.session = session
        self.url = url
        self.flags = flags
        self.client_id = uuid.uuid4().hex
        self.frames = []  # (monotonic time, "text", dict) or (time, "binary", bytes)
        self.ws = None
        self.reader = None

    async def open(self):
        ws_url = self.url.replace("http", "ws", 1) + "/ws?clientId=" + self.client_id
        self.ws = await self.session.ws_connect(ws_url)
        await self.ws.send_str(json.dumps({"type": "feature_flags", "data": self.flags}))
        self.reader = asyncio.create_task(self._read())

    async def _read(self):
        async for msg in self.ws:
            now = time.monotonic()
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.frames.append((now, "text", json.loads(msg.data)))
            elif msg.type == aiohttp.WSMsgType.BINARY:
                self.frames.append((now, "binary", bytes(msg.data)))

    async def wait_for(self, predicate, timeout=30.0, start=0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i in range(start, len(self.frames)):
                if predicate(self.frames[i]):
                    return i, self.frames[i]
            await asyncio.sleep(0.02)
        raise TimeoutError("%s: nothing matched within %s s" % (self.name, timeout))

    async def close(self):
        await self.ws.close()
        self.reader.cancel()


def text_of(frame, kind=None):
    _, k, obj = frame
    if k != "text" or (kind is not None and obj["type"] != kind):
        return None
    return obj


def is_end(prompt_id):
    def match(frame):
        obj = text_of(frame, "executing")
        return obj is not None and obj["data"].get("node") is None and obj["data"].get("prompt_id") == prompt_id

    return match


def summary(frames):
    out = []
    for _, kind, obj in frames:
        if kind == "binary":
            out.append("bin%d" % int.from_bytes(obj[:4], "big"))
            continue
        t, d = obj["type"], obj["data"]
        if t in ("executing", "executed") and isinstance(d, dict):
            out.append("%s(%s)" % (t, d.get("node")))
        elif t == "progress":
            out.append("progress(%s/%s)" % (d.get("value"), d.get("max")))
        else:
            out.append(t)
    return out


def compact(frames):
    """Collapse progress_state runs so the printed lists stay readable."""
    out = []
    for item in summary(frames):
        if out and item == "progress_state" and out[-1].startswith("progress_state"):
            n = int(out[-1].split("x")[1]) if "x" in out[-1] else 1
            out[-1] = "progress_state x%d" % (n + 1)
        else:
            out.append(item)
    return out


class Checks:
    def __init__(self):
        self.results = []

    def check(self, name, ok, detail=""):
        self.results.append((name, bool(ok), detail))
        print("  [%s] %s%s" % ("PASS" if ok else "FAIL", name, (" - " + detail) if detail else ""))


async def queue(session, url, prompt, client_id=None):
    body = {"prompt": prompt}
    if client_id is not None:
        body["client_id"] = client_id
    async with session.post(url + "/prompt", json=body) as r:
        reply = await r.json()
        if r.status != 200:
            raise RuntimeError("queue failed: %s %s" % (r.status, reply))
        return reply["prompt_id"]


async def answer(session, url, secret, ask_id, text):
    headers = {} if secret is None else {SECRET_HEADER: secret}
    async with session.post(
        url + "/comfy_bridge/answer", json={"ask_id": ask_id, "answer": text}, headers=headers
    ) as r:
        try:
            body = await r.json(content_type=None)
        except ValueError:
            body = None
        return r.status, body


async def main(url):
    checks = Checks()
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/features") as r:
            features = await r.json()
        print("GET /features:", json.dumps(features))
        checks.check(
            "version in /features", isinstance(features.get("comfy_bridge_tap"), str), features.get("comfy_bridge_tap")
        )

        browser = Socket("browser", session, url, BROWSER_FLAGS)
        tap = Socket("tap", session, url, TAP_FLAGS)
        await browser.open()
        await tap.open()
        _, hello = await tap.wait_for(lambda f: text_of(f, "comfy_bridge.hello") is not None, 10)
        secret = text_of(hello)["data"]["secret"]
        await asyncio.sleep(0.3)
        print("\nbrowser handshake:", summary(browser.frames))
        print("tap handshake:    ", summary(tap.frames))
        reply = [text_of(f) for f in browser.frames if text_of(f, "feature_flags")]
        checks.check(
            "version in the flags reply",
            reply and reply[0]["data"].get("comfy_bridge_tap") == features.get("comfy_bridge_tap"),
        )
        checks.check(
            "hello with a secret only to the tap",
            len(secret) >= 40 and not any(text_of(f, "comfy_bridge.hello") for f in browser.frames),
        )

        # 1. a prompt queued by the browser
        print("\n1. probe workflow queued with the browser's client id")
        b0, t0 = len(browser.frames), len(tap.frames)
        pid = await queue(session, url, probe_workflow(), browser.client_id)
        ti, _ = await tap.wait_for(is_end(pid), 60, t0)
        bi, _ = await browser.wait_for(is_end(pid), 10, b0)
        seen_b, seen_t = browser.frames[b0 : bi + 1], tap.frames[t0 : ti + 1]
        print("  browser got:", compact(seen_b))
        print("  tap got:    ", compact(seen_t))
        checks.check(
            "tap got exactly the browser's frames",
            [f[1:] for f in seen_b] == [f[1:] for f in seen_t],
            "%d frames each" % len(seen_b),
        )
        checks.check(
            "with previews and progress",
            "bin4" in summary(seen_t) and any(s.startswith("progress(") for s in summary(seen_t)),
        )

        # 2. a prompt queued with no client id
        print("\n2. probe workflow queued with no client id")
        b0, t0 = len(browser.frames), len(tap.frames)
        pid = await queue(session, url, probe_workflow())
        ti, _ = await tap.wait_for(is_end(pid), 60, t0)
        await asyncio.sleep(0.3)
        seen_b, seen_t = browser.frames[b0:], tap.frames[t0 : ti + 1]
        print("  browser got:", compact(seen_b))
        print("  tap got:    ", compact(seen_t))
        wanted = [
            "execution_start",
            "execution_cached",
            "executing(2)",
            "executed(5)",
            "executed(4)",
            "execution_success",
            "executing(None)",
        ]
        got = summary(seen_t)
        checks.check(
            "tap got the lifecycle events",
            all(w in got for w in wanted),
            ", ".join(w for w in wanted if w not in got) or "all of " + ", ".join(wanted),
        )
        checks.check(
            "browser got no lifecycle events",
            not any(s.startswith(("execution_start", "executing", "executed")) for s in summary(seen_b)),
        )

        # 3. Bus Ask answered over POST /comfy_bridge/answer
        print("\n3. Bus Ask answered over POST /comfy_bridge/answer")
        b0, t0 = len(browser.frames), len(tap.frames)
        pid = await queue(session, url, ask_workflow(30), browser.client_id)
        _, ask_frame = await tap.wait_for(lambda f: text_of(f, "comfy_bridge.ask") is not None, 30, t0)
        ask = text_of(ask_frame)["data"]
        print("  tap got ask:", json.dumps(ask))
        started = time.monotonic()
        async with session.get(url + "/queue") as r:
            await r.read()
        checks.check(
            "ComfyUI answers HTTP while the node waits",
            time.monotonic() - started < 1.0,
            "%.0f ms for GET /queue" % (1000 * (time.monotonic() - started)),
        )
        status, body = await answer(session, url, "wrong-secret", ask["ask_id"], "nope")
        checks.check("wrong secret -> 403", status == 403, "%s %s" % (status, body))
        answer_text = json.dumps({"prompt": "a red fox in the snow"})
        status, body = await answer(session, url, secret, ask["ask_id"], answer_text)
        checks.check("answer -> 200 accepted", status == 200 and body == {"accepted": True}, "%s %s" % (status, body))
        status, body = await answer(session, url, secret, ask["ask_id"], "second")
        checks.check(
            "second answer -> 409 late", status == 409 and body.get("reason") == "late", "%s %s" % (status, body)
        )
        ti, _ = await tap.wait_for(is_end(pid), 30, t0)
        seen_t = tap.frames[t0 : ti + 1]
        print("  tap got:    ", compact(seen_t))
        print("  browser got:", compact(browser.frames[b0:]))
        texts = {text_of(f)["data"]["node"]: text_of(f)["data"]["output"] for f in seen_t if text_of(f, "executed")}
        checks.check(
            "the next node got the answer text", texts.get("2") == {"text": [answer_text]}, json.dumps(texts.get("2"))
        )
        checks.check(
            "answer_json fed a node as a dict",
            texts.get("3") == {"text": [{"prompt": "a red fox in the snow"}]},
            json.dumps(texts.get("3")),
        )
        done = [text_of(f)["data"] for f in seen_t if text_of(f, "comfy_bridge.ask_done")]
        checks.check("ask_done answered", done and done[0]["outcome"] == "answered", json.dumps(done))
        published = [text_of(f)["data"] for f in seen_t if text_of(f, "comfy_bridge.publish")]
        print("  tap got publish:", json.dumps(published))
        ok = (
            bool(published)
            and published[0]["payload"] == {"prompt": "a red fox in the snow"}
            and published[0]["subject"] == "live/check"
        )
        checks.check("Bus Publish reached the tap with the JSON payload", ok)
        if published and "image" in published[0]:
            ref = published[0]["image"]
            async with session.get(url + "/view", params=ref) as r:
                data = await r.read()
            checks.check(
                "published image is served by /view",
                r.status == 200 and data[:8] == b"\x89PNG\r\n\x1a\n",
                "%s, %d bytes" % (r.status, len(data)),
            )
        else:
            checks.check("published image is served by /view", False, "no image in the publish message")
        checks.check(
            "browser got no comfy_bridge.* message",
            not any((text_of(f) or {}).get("type", "").startswith("comfy_bridge.") for f in browser.frames),
        )

        # 4. timeouts
        print("\n4. Bus Ask left unanswered (timeout 1.5 s)")
        t0 = len(tap.frames)
        started = time.monotonic()
        pid = await queue(session, url, ask_workflow(1.5, "error"), browser.client_id)
        ti, _ = await tap.wait_for(is_end(pid), 30, t0)
        seen_t = tap.frames[t0 : ti + 1]
        print("  tap got:", compact(seen_t))
        errors = [text_of(f)["data"] for f in seen_t if text_of(f, "execution_error")]
        message = errors[0]["exception_message"] if errors else ""
        checks.check(
            "on_timeout=error fails the prompt with a clear error",
            "no answer on ask/prompt within 1.5 s" in message,
            message.strip(),
        )
        done = [text_of(f)["data"]["outcome"] for f in seen_t if text_of(f, "comfy_bridge.ask_done")]
        checks.check("ask_done timeout", done == ["timeout"], "%s after %.1f s" % (done, time.monotonic() - started))

        t0 = len(tap.frames)
        pid = await queue(session, url, ask_workflow(1.0, "default", '{"prompt": "fallback"}'), None)
        ti, _ = await tap.wait_for(is_end(pid), 30, t0)
        seen_t = tap.frames[t0 : ti + 1]
        print("  (default, no client id) tap got:", compact(seen_t))
        texts = {text_of(f)["data"]["node"]: text_of(f)["data"]["output"] for f in seen_t if text_of(f, "executed")}
        checks.check(
            "on_timeout=default continues with the default",
            texts.get("3") == {"text": [{"prompt": "fallback"}]},
            json.dumps(texts),
        )

        # 5. interrupt during the wait
        print("\n5. Bus Ask interrupted during its wait (POST /interrupt)")
        t0 = len(tap.frames)
        pid = await queue(session, url, ask_workflow(60), browser.client_id)
        _, ask_frame = await tap.wait_for(lambda f: text_of(f, "comfy_bridge.ask") is not None, 30, t0)
        ask = text_of(ask_frame)["data"]
        await asyncio.sleep(0.3)
        interrupted_at = time.monotonic()
        async with session.post(url + "/interrupt", json={}) as r:
            await r.read()
        ii, _ = await tap.wait_for(lambda f: text_of(f, "execution_interrupted") is not None, 10, t0)
        took = tap.frames[ii][0] - interrupted_at
        ti, _ = await tap.wait_for(is_end(pid), 10, t0)
        seen_t = tap.frames[t0 : ti + 1]
        print("  tap got:", compact(seen_t))
        checks.check(
            "interrupt ends the wait at once",
            took < 1.0,
            "execution_interrupted %.0f ms after POST /interrupt" % (1000 * took),
        )
        done = [text_of(f)["data"]["outcome"] for f in seen_t if text_of(f, "comfy_bridge.ask_done")]
        checks.check("ask_done interrupted", done == ["interrupted"], str(done))
        status, body = await answer(session, url, secret, ask["ask_id"], "too late")
        checks.check(
            "answer after the interrupt -> 409 late",
            status == 409 and body.get("reason") == "late",
            "%s %s" % (status, body),
        )

        await browser.close()
        await tap.close()

    failed = [name for name, ok, _ in checks.results if not ok]
    print("\n%d passed, %d failed" % (len(checks.results) - len(failed), len(failed)))
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8188")
    sys.exit(asyncio.run(main(parser.parse_args().url.rstrip("/"))))
