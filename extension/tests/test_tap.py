"""The tap: what tap sockets and ordinary sockets receive."""

import json
import logging
import unittest

from comfy_bridge_tap import tap as tap_module
from comfy_bridge_tap.version import FEATURE_FLAG, VERSION

from .harness import BROWSER_FLAGS, Harness, kinds, since


class TapTestCase(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self):
        self.h = Harness()

    async def asyncTearDown(self):
        self.h.close()


class MirroringTests(TapTestCase):
    async def test_tap_gets_every_event_of_a_browser_prompt_unchanged(self):
        """A person's prompt in the browser reaches the bridge with full detail,
        text and binary frames byte for byte, in the browser's order."""
        browser = await self.h.browser()
        bridge = await self.h.bridge()
        b0, t0 = len(browser.frames), len(bridge.frames)
        await self.h.run_prompt("p1", client_id="browser")

        seen_by_browser = since(browser, b0)
        seen_by_tap = since(bridge, t0)
        self.assertEqual(
            kinds(seen_by_browser),
            [
                "status",
                "status",
                "execution_start",
                "execution_cached",
                "executing",
                "progress",
                ("bin", 4),
                "progress",
                ("bin", 4),
                "executing",
                "executed",
                "execution_success",
                "status",
                "executing",
            ],
        )
        self.assertEqual(seen_by_tap, seen_by_browser)
        self.assertEqual(seen_by_tap[-1], ("text", {"type": "executing", "data": {"node": None, "prompt_id": "p1"}}))

    async def test_prompt_for_an_absent_client_is_mirrored(self):
        """A script that queued with a client id but never connected: ComfyUI
        sends its events to nobody, the tap still gets them."""
        bridge = await self.h.bridge()
        t0 = len(bridge.frames)
        await self.h.run_prompt("p2", client_id="script-never-connected")
        got = kinds(since(bridge, t0))
        self.assertIn("execution_start", got)
        self.assertIn("executed", got)
        self.assertEqual(got[-1], "executing")

    async def test_legacy_preview_type_1_is_mirrored_as_sent(self):
        """A client that did not negotiate metadata gets type-1 previews; the
        tap gets those very frames, not a re-encoded type 4."""
        _, plain = await self.h.server.connect("plain")
        bridge = await self.h.bridge()
        t0, p0 = len(bridge.frames), len(plain.frames)
        await self.h.run_prompt("p3", client_id="plain")
        self.assertEqual(plain.binaries()[-2:], bridge.binaries()[-2:])
        self.assertEqual({b[:4] for b in plain.binaries()}, {b"\x00\x00\x00\x01"})
        self.assertEqual(since(bridge, t0), since(plain, p0))


class NoDuplicateTests(TapTestCase):
    async def test_broadcasts_reach_each_socket_once(self):
        browser = await self.h.browser()
        bridge = await self.h.bridge()
        b0, t0 = len(browser.frames), len(bridge.frames)
        self.h.server.send_sync("status", {"status": {"exec_info": {"queue_remaining": 3}}})
        self.h.server.send_sync("bridge_probe.custom", {"message": "hi"}, None)
        self.h.server.send_sync(3, b"\x00\x00\x00\x011hello", None)
        await self.h.server.drain()
        expected = ["status", "bridge_probe.custom", ("bin", 3)]
        self.assertEqual(kinds(since(browser, b0)), expected)
        self.assertEqual(kinds(since(bridge, t0)), expected)

    async def test_a_taps_own_prompt_is_not_mirrored_back_to_it(self):
        """The bridge's own prompt reaches it once; messages aimed at a tap are
        not copied to other taps either."""
        browser = await self.h.browser()
        bridge = await self.h.bridge()
        other = await self.h.bridge("bridge-2")
        b0, t0, o0 = len(browser.frames), len(bridge.frames), len(other.frames)
        await self.h.run_prompt("p4", client_id="bridge")
        own = kinds(since(bridge, t0))
        self.assertEqual(own.count("execution_start"), 1)
        self.assertEqual(own.count("executing"), 3)
        self.assertEqual(kinds(since(other, o0)), ["status", "status", "status"])
        self.assertEqual(kinds(since(browser, b0)), ["status", "status", "status"])

    async def test_two_taps_each_get_one_copy_of_a_browser_prompt(self):
        await self.h.browser()
        first = await self.h.bridge("bridge-1")
        second = await self.h.bridge("bridge-2")
        f0, s0 = len(first.frames), len(second.frames)
        await self.h.run_prompt("p5", client_id="browser")
        self.assertEqual(kinds(since(first, f0)).count("execution_start"), 1)
        self.assertEqual(kinds(since(first, f0)).count("progress"), 2)
        self.assertEqual(since(first, f0), since(second, s0))

    async def test_tap_that_left_gets_nothing_and_its_id_reused_by_a_browser_is_not_a_tap(self):
        bridge = await self.h.bridge()
        self.h.server.disconnect("bridge")
        reuse = await self.h.socket("bridge", BROWSER_FLAGS)
        await self.h.browser()
        r0, t0 = len(reuse.frames), len(bridge.frames)
        self.assertEqual(self.h.tap.tap_sids(), [])
        await self.h.run_prompt("p6", client_id="browser")
        self.assertEqual(len(bridge.frames), t0)
        self.assertEqual(kinds(since(reuse, r0)), ["status", "status", "status"])
        self.assertNotIn("comfy_bridge.hello", reuse.types())


class HandshakeTests(TapTestCase):
    async def test_a_browsers_handshake_is_not_mirrored(self):
        bridge = await self.h.bridge()
        t0 = len(bridge.frames)
        browser = await self.h.browser()
        self.assertEqual(browser.types(), ["status", "feature_flags"])
        self.assertEqual(browser.texts()[0]["data"]["sid"], "browser")
        self.assertEqual(since(bridge, t0), [])

    async def test_reconnect_hint_is_not_mirrored(self):
        """The executing-without-prompt_id replay a reconnecting browser gets."""
        bridge = await self.h.bridge()
        self.h.server.client_id = "browser"
        self.h.server.last_node_id = "7"
        t0 = len(bridge.frames)
        browser = await self.h.browser()
        self.assertEqual(browser.types(), ["status", "executing", "feature_flags"])
        self.assertEqual(since(bridge, t0), [])


class NoClientIdTests(TapTestCase):
    async def test_prompt_without_client_id_reaches_taps_with_lifecycle_events(self):
        browser = await self.h.browser()
        bridge = await self.h.bridge()
        b0, t0 = len(browser.frames), len(bridge.frames)
        await self.h.run_prompt("p7", client_id=None)
        self.assertEqual(
            kinds(since(bridge, t0)),
            [
                "status",
                "status",
                "execution_start",
                "execution_cached",
                "executing",
                "progress",
                ("bin", 1),
                "progress",
                ("bin", 1),
                "executing",
                "executed",
                "execution_success",
                "status",
                "executing",
            ],
        )
        texts = [f for k, f in since(bridge, t0) if k == "text"]
        self.assertEqual(texts[2]["data"], {"prompt_id": "p7", "timestamp": 1760000000000})
        self.assertEqual(texts[4]["data"], {"node": "2", "display_node": "2", "prompt_id": "p7"})
        self.assertEqual(texts[-1]["data"], {"node": None, "prompt_id": "p7"})
        # the browser gets what ComfyUI always broadcast for such a prompt, nothing more
        self.assertEqual(
            kinds(since(browser, b0)),
            ["status", "status", "progress", ("bin", 1), "progress", ("bin", 1), "status"],
        )

    async def test_interrupted_prompt_without_client_id_reaches_taps_once(self):
        bridge = await self.h.bridge()
        t0 = len(bridge.frames)
        await self.h.run_prompt("p8", nodes=[{"id": "2", "steps": 1, "interrupt": True}])
        got = kinds(since(bridge, t0))
        self.assertEqual(got.count("execution_interrupted"), 1)
        self.assertEqual(got[-1], "executing")

    async def test_failed_prompt_without_client_id_reaches_taps(self):
        browser = await self.h.browser()
        bridge = await self.h.bridge()
        b0, t0 = len(browser.frames), len(bridge.frames)
        await self.h.run_prompt("p9", nodes=[{"id": "3", "error": True}])
        self.assertIn("execution_error", kinds(since(bridge, t0)))
        self.assertNotIn("execution_error", kinds(since(browser, b0)))

    async def test_execution_blocked_stays_a_broadcast(self):
        browser = await self.h.browser()
        bridge = await self.h.bridge()
        b0, t0 = len(browser.frames), len(bridge.frames)
        await self.h.run_prompt("p10", nodes=[{"id": "5", "blocked": "stop"}])
        self.assertEqual(kinds(since(browser, b0)).count("execution_error"), 1)
        self.assertEqual(kinds(since(bridge, t0)).count("execution_error"), 1)

    async def test_cached_output_replay_reaches_taps(self):
        bridge = await self.h.bridge()
        t0 = len(bridge.frames)
        await self.h.run_prompt("p11", nodes=[{"id": "4", "cached": True, "ui": {"text": ["x"]}}])
        executed = [f["data"] for k, f in since(bridge, t0) if k == "text" and f["type"] == "executed"]
        self.assertEqual(executed, [{"node": "4", "display_node": "4", "output": {"text": ["x"]}, "prompt_id": "p11"}])


class BrowserUnchangedTests(unittest.IsolatedAsyncioTestCase):
    async def _scenario(self, with_tap):
        h = Harness(with_tap=with_tap)
        try:
            browser = await h.browser()
            await h.bridge()
            await h.run_prompt("a", client_id="browser")
            await h.run_prompt("b", client_id=None)
            await h.run_prompt("c", client_id="bridge")
            await h.run_prompt(
                "d", client_id="browser", nodes=[{"id": "5", "blocked": "x"}, {"id": "6", "error": True}]
            )
            return browser.frames
        finally:
            h.close()

    async def test_browser_gets_exactly_what_it_got_without_the_tap(self):
        without = await self._scenario(with_tap=False)
        with_tap = await self._scenario(with_tap=True)
        # the only difference ComfyUI itself shows: the version in the flags reply
        reply = with_tap[1][1]
        self.assertEqual(reply["data"].pop(FEATURE_FLAG), VERSION)
        self.assertEqual(with_tap, without)


class FeatureFlagTests(TapTestCase):
    async def test_version_in_features_and_in_every_flags_reply(self):
        self.assertEqual(self.h.feature_flags.get_server_features()[FEATURE_FLAG], VERSION)
        browser = await self.h.browser()
        bridge = await self.h.bridge()
        for ws in (browser, bridge):
            reply = [m for m in ws.texts() if m["type"] == "feature_flags"][0]
            self.assertEqual(reply["data"][FEATURE_FLAG], VERSION)
            self.assertTrue(reply["data"]["supports_preview_metadata"])
        self.assertNotIn(self.h.tap.secret, json.dumps(self.h.feature_flags.get_server_features()))

    async def test_hello_with_secret_only_to_taps_right_after_their_flags_reply(self):
        browser = await self.h.browser()
        bridge = await self.h.bridge()
        self.assertEqual(bridge.types(), ["status", "feature_flags", "comfy_bridge.hello"])
        self.assertEqual(bridge.texts()[2]["data"], {"version": VERSION, "secret": self.h.tap.secret})
        self.assertGreaterEqual(len(self.h.tap.secret), 40)
        await self.h.run_prompt("p12", client_id="browser")
        self.assertNotIn(self.h.tap.secret, json.dumps(browser.texts()))
        self.assertFalse([t for t in browser.types() if t.startswith("comfy_bridge.")])

    async def test_flag_must_be_true_in_the_first_message(self):
        """ComfyUI reads only the first JSON message; the flag must be JSON true."""
        late = await self.h.socket("late", {"comfy_bridge_tap": True}, first_text='{"type":"hello"}')
        stringly = await self.h.socket("stringly", {"comfy_bridge_tap": "true"})
        for ws in (late, stringly):
            self.assertNotIn("comfy_bridge.hello", ws.types())
        self.assertEqual(self.h.tap.tap_sids(), [])
        await self.h.run_prompt("p13", client_id="browser-x")
        self.assertNotIn("execution_start", late.types() + stringly.types())


class FailureTests(TapTestCase):
    async def test_a_failing_tap_socket_never_stops_the_browsers_messages(self):
        browser = await self.h.browser()
        bridge = await self.h.bridge()
        healthy = await self.h.bridge("bridge-2")
        # fails on everything but the status broadcasts, which ComfyUI itself sends
        bridge.fail_with = RuntimeError("tap socket exploded")
        bridge.fail_except = {"status"}
        b0, h0 = len(browser.frames), len(healthy.frames)
        with self.assertLogs("comfy_bridge_tap", level="WARNING") as logs:
            await self.h.run_prompt("p14", client_id="browser")
            await self.h.run_prompt("p15", client_id="browser")
        self.assertEqual(kinds(since(browser, b0)).count("execution_start"), 2)
        self.assertEqual(kinds(since(browser, b0)).count("progress"), 4)
        self.assertEqual(since(healthy, h0), since(browser, b0))
        # dozens of failed sends, one warning per place (text, binary)
        warnings = [r.getMessage() for r in logs.records if r.levelno >= logging.WARNING]
        self.assertEqual(len(warnings), 2, warnings)
        self.assertTrue(any("mirror text" in w for w in warnings))
        self.assertTrue(any("mirror binary" in w for w in warnings))

    async def test_an_exception_inside_the_tap_is_swallowed_and_the_send_happens(self):
        browser = await self.h.browser()
        await self.h.bridge()

        def broken():
            raise KeyError("tap state broken")

        self.h.tap.tap_sids = broken
        b0 = len(browser.frames)
        with self.assertLogs("comfy_bridge_tap", level="WARNING"):
            await self.h.run_prompt("p16", client_id="browser")
            await self.h.run_prompt("p17", client_id=None)
        got = kinds(since(browser, b0))
        self.assertEqual(got.count("execution_start"), 1)
        self.assertEqual(got.count("execution_success"), 1)
        self.assertEqual(got.count("progress"), 4)
        self.assertEqual(self.h.server.prompt_queue.currently_running, {})

    async def test_install_twice_wraps_once(self):
        again = tap_module.Tap(server=self.h.server)
        with self.assertLogs("comfy_bridge_tap", level="WARNING"):
            again.install(execution=self.h.execution, feature_flags=self.h.feature_flags)
        browser = await self.h.browser()
        bridge = await self.h.bridge()
        b0, t0 = len(browser.frames), len(bridge.frames)
        await self.h.run_prompt("p18", client_id="browser")
        self.assertEqual(since(bridge, t0), since(browser, b0))


if __name__ == "__main__":
    unittest.main()
