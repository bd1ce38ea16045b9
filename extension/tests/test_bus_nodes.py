"""Bus Publish and Bus Ask against the stand-in server, and the answer route."""

import asyncio
import functools
import json
import time
import unittest

from comfy_bridge_tap import asks
from comfy_bridge_tap.bus_nodes import ANY, NODE_CLASS_MAPPINGS, BusAsk, BusPublish
from comfy_bridge_tap.version import ANSWER_ROUTE, SECRET_HEADER

from . import standins
from .harness import Harness, since


class NodeTestCase(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self):
        self.h = Harness()
        self.h.server.last_prompt_id = "prompt-1"
        self.route = self.h.server.routes.handlers[("POST", ANSWER_ROUTE)]

    async def asyncTearDown(self):
        self.h.close()

    def in_worker(self, fn, *args, **kwargs):
        """Run a node function on a thread, as ComfyUI's worker does."""
        return self.h.loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))

    async def post(self, body, secret="right", **kwargs):
        headers = {}
        if secret is not None:
            headers[SECRET_HEADER] = self.h.tap.secret if secret == "right" else secret
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        response = await self.route(standins.FakeRequest(body, headers, **kwargs))
        return response.status, response.body

    async def answer(self, ask_id, text, secret="right"):
        return await self.post({"ask_id": ask_id, "answer": text}, secret=secret)

    async def next_message(self, ws, kind, start=0, timeout=2.0):
        """The first ``kind`` message ``ws`` got after frame ``start``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await self.h.server.drain()
            for k, frame in since(ws, start):
                if k == "text" and frame["type"] == kind:
                    return frame["data"]
            await asyncio.sleep(0.01)
        self.fail("no %s message; got %s" % (kind, ws.types()))

    async def finish(self, future):
        result = await asyncio.wait_for(future, 5)
        await self.h.server.drain()
        return result


class PublishTests(NodeTestCase):
    async def test_publish_sends_json_payload_to_taps_only(self):
        browser = await self.h.browser()
        bridge = await self.h.bridge()
        b0 = len(browser.frames)
        await self.finish(
            self.in_worker(BusPublish().publish, "lights/kitchen", '{"on": true, "level": 3}', unique_id="9")
        )
        data = await self.next_message(bridge, "comfy_bridge.publish")
        self.assertEqual(
            data,
            {"prompt_id": "prompt-1", "node_id": "9", "subject": "lights/kitchen", "payload": {"on": True, "level": 3}},
        )
        self.assertEqual(since(browser, b0), [])

    async def test_publish_sends_text_that_is_not_json_as_a_string(self):
        bridge = await self.h.bridge()
        for text, expected in (("hello world", "hello world"), ("42", 42), ("NaN", "NaN"), ("[1, 2", "[1, 2")):
            start = len(bridge.frames)
            await self.finish(self.in_worker(BusPublish().publish, "note", text, unique_id="3"))
            self.assertEqual((await self.next_message(bridge, "comfy_bridge.publish", start))["payload"], expected)

    async def test_publish_with_image_saves_a_temp_png_and_names_it(self):
        bridge = await self.h.bridge()
        image = object()
        result = await self.finish(self.in_worker(BusPublish().publish, "snap", "{}", image=image, unique_id="5"))
        data = await self.next_message(bridge, "comfy_bridge.publish")
        ref = {"filename": "comfy_bridge_temp_x_00001_.png", "subfolder": "", "type": "temp"}
        self.assertEqual(data["image"], ref)
        self.assertEqual(self.h.saved_images, [image])
        self.assertEqual(result, {"ui": {"images": [ref]}})

    async def test_publish_without_a_tap_is_a_no_op(self):
        browser = await self.h.browser()
        b0 = len(browser.frames)
        started = time.monotonic()
        result = await self.finish(self.in_worker(BusPublish().publish, "x", "{}", image=object(), unique_id="1"))
        self.assertLess(time.monotonic() - started, 0.5)
        self.assertEqual(result, {"ui": {}})
        self.assertEqual(self.h.saved_images, [])
        self.assertEqual(since(browser, b0), [])

    async def test_empty_subject_is_refused(self):
        with self.assertRaises(ValueError):
            BusPublish().publish("  ", "{}")


class AskTests(NodeTestCase):
    def ask(self, timeout=10.0, on_timeout="error", default="", payload='{"q": "prompt?"}', subject="prompt"):
        return self.in_worker(BusAsk().ask, subject, payload, timeout, on_timeout, default, unique_id="12")

    async def test_answered_ask_returns_the_answer_and_its_json(self):
        browser = await self.h.browser()
        bridge = await self.h.bridge()
        b0 = len(browser.frames)
        node = self.ask()
        question = await self.next_message(bridge, "comfy_bridge.ask")
        self.assertEqual(
            {k: v for k, v in question.items() if k != "ask_id"},
            {
                "prompt_id": "prompt-1",
                "node_id": "12",
                "subject": "prompt",
                "payload": {"q": "prompt?"},
                "timeout_seconds": 10.0,
            },
        )
        self.assertGreaterEqual(len(question["ask_id"]), 20)
        self.assertEqual(await self.answer(question["ask_id"], '{"text": "a red fox"}'), (200, {"accepted": True}))
        self.assertEqual(await self.finish(node), ('{"text": "a red fox"}', {"text": "a red fox"}))
        done = await self.next_message(bridge, "comfy_bridge.ask_done")
        self.assertEqual(
            done, {"ask_id": question["ask_id"], "prompt_id": "prompt-1", "node_id": "12", "outcome": "answered"}
        )
        self.assertEqual(since(browser, b0), [])

    async def test_ask_with_an_image_names_its_png_in_the_question(self):
        bridge = await self.h.bridge()
        image = object()
        node = self.in_worker(BusAsk().ask, "approve", "ok?", 10.0, "error", "", image=image, unique_id="7")
        question = await self.next_message(bridge, "comfy_bridge.ask")
        ref = {"filename": "comfy_bridge_temp_x_00001_.png", "subfolder": "", "type": "temp"}
        self.assertEqual(question["image"], ref)
        self.assertEqual(self.h.saved_images, [image])
        self.assertEqual(await self.answer(question["ask_id"], "yes"), (200, {"accepted": True}))
        self.assertEqual(await self.finish(node), ("yes", "yes"))

    async def test_second_answer_gets_409_and_the_first_wins(self):
        bridge = await self.h.bridge()
        node = self.ask()
        ask_id = (await self.next_message(bridge, "comfy_bridge.ask"))["ask_id"]
        self.assertEqual((await self.answer(ask_id, "first"))[0], 200)
        self.assertEqual(await self.answer(ask_id, "second"), (409, {"accepted": False, "reason": "late"}))
        self.assertEqual(await self.finish(node), ("first", "first"))
        self.assertEqual(await self.answer(ask_id, "third"), (409, {"accepted": False, "reason": "late"}))

    async def test_timeout_with_error_raises_a_clear_error(self):
        bridge = await self.h.bridge()
        node = self.ask(timeout=0.2)
        ask_id = (await self.next_message(bridge, "comfy_bridge.ask"))["ask_id"]
        with self.assertRaisesRegex(TimeoutError, "no answer on ask/prompt within 0.2 s"):
            await self.finish(node)
        self.assertEqual((await self.next_message(bridge, "comfy_bridge.ask_done"))["outcome"], "timeout")
        self.assertEqual(await self.answer(ask_id, "too late"), (409, {"accepted": False, "reason": "late"}))

    async def test_timeout_with_default_returns_the_default(self):
        bridge = await self.h.bridge()
        node = self.ask(timeout=0.2, on_timeout="default", default='["a", "b"]')
        self.assertEqual(await self.finish(node), ('["a", "b"]', ["a", "b"]))
        self.assertEqual((await self.next_message(bridge, "comfy_bridge.ask_done"))["outcome"], "timeout")

    async def test_interrupt_ends_the_wait_at_once(self):
        bridge = await self.h.bridge()
        node = self.ask(timeout=30)
        ask_id = (await self.next_message(bridge, "comfy_bridge.ask"))["ask_id"]
        interrupted_at = time.monotonic()
        self.h.model_management.interrupt_current_processing(True)
        with self.assertRaises(standins.InterruptProcessingException):
            await self.finish(node)
        self.assertLess(time.monotonic() - interrupted_at, 0.5)
        # raised the way ComfyUI does, which clears the flag for the next prompt
        self.assertFalse(self.h.model_management.processing_interrupted())
        self.assertEqual((await self.next_message(bridge, "comfy_bridge.ask_done"))["outcome"], "interrupted")
        self.assertEqual(await self.answer(ask_id, "late"), (409, {"accepted": False, "reason": "late"}))
        self.assertEqual(len(self.h.tap.registry), 0)

    async def test_answer_of_an_old_prompt_never_reaches_a_new_one(self):
        bridge = await self.h.bridge()
        old = self.ask(timeout=0.1, on_timeout="default", default="d")
        old_id = (await self.next_message(bridge, "comfy_bridge.ask"))["ask_id"]
        await self.finish(old)
        self.h.server.last_prompt_id = "prompt-2"
        start = len(bridge.frames)
        new = self.ask(timeout=10)
        new_question = await self.next_message(bridge, "comfy_bridge.ask", start)
        self.assertNotEqual(new_question["ask_id"], old_id)
        self.assertEqual(new_question["prompt_id"], "prompt-2")
        self.assertEqual((await self.answer(old_id, "for the old one"))[0], 409)
        self.assertEqual((await self.answer(new_question["ask_id"], "for the new one"))[0], 200)
        self.assertEqual(await self.finish(new), ("for the new one", "for the new one"))

    async def test_ask_without_a_tap_waits_and_a_tap_that_connects_gets_it(self):
        node = self.ask(timeout=10)
        deadline = time.monotonic() + 2
        while len(self.h.tap.registry) == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # let the node queue its ask message
        await self.h.server.drain()  # the ask went out to no one
        bridge = await self.h.bridge()
        self.assertEqual(bridge.types(), ["status", "feature_flags", "comfy_bridge.hello", "comfy_bridge.ask"])
        ask_id = (await self.next_message(bridge, "comfy_bridge.ask"))["ask_id"]
        self.assertEqual((await self.answer(ask_id, "ok"))[0], 200)
        self.assertEqual(await self.finish(node), ("ok", "ok"))

    async def test_ask_without_a_tap_still_honours_its_timeout(self):
        started = time.monotonic()
        node = self.ask(timeout=0.2, on_timeout="default", default="nobody")
        self.assertEqual(await self.finish(node), ("nobody", "nobody"))
        self.assertLess(time.monotonic() - started, 1.0)

    async def test_pending_asks_are_bounded(self):
        self.h.tap.registry = asks.AskRegistry(max_pending=1)
        bridge = await self.h.bridge()
        first = self.ask(timeout=10)
        ask_id = (await self.next_message(bridge, "comfy_bridge.ask"))["ask_id"]
        with self.assertRaises(asks.TooManyAsks):
            await self.finish(self.ask(timeout=10))
        await self.answer(ask_id, "done")
        await self.finish(first)

    async def test_prompt_end_closes_an_ask_left_behind(self):
        bridge = await self.h.bridge()
        queue = self.h.server.prompt_queue
        item_id = queue.start((0, "prompt-9", {}, {}, []))
        stray = self.h.tap.registry.open("prompt-9", "4", "s", {}, 5)
        queue.task_done(item_id, {}, status=None)
        done = await self.next_message(bridge, "comfy_bridge.ask_done")
        self.assertEqual(done, {"ask_id": stray.ask_id, "prompt_id": "prompt-9", "node_id": "4", "outcome": "failed"})
        self.assertEqual((await self.answer(stray.ask_id, "x"))[1]["reason"], "late")


class AnswerRouteTests(NodeTestCase):
    async def asyncSetUp(self):
        await super().asyncSetUp()
        self.pending = self.h.tap.registry.open("prompt-1", "12", "s", {}, 30)

    async def test_wrong_or_missing_secret_is_403_and_the_ask_keeps_waiting(self):
        body = {"ask_id": self.pending.ask_id, "answer": "x"}
        for secret in ("wrong", None, ""):
            status, reply = await self.post(body, secret=secret)
            self.assertEqual(status, 403)
            self.assertEqual(reply["accepted"], False)
        self.assertIsNone(self.pending.answer)
        self.assertEqual((await self.post(body))[0], 200)

    async def test_malformed_bodies_are_400_and_say_what_is_wrong(self):
        cases = [
            (b"not json", "not JSON"),
            (b"[1, 2]", "not a JSON object"),
            ({"answer": "x"}, "ask_id"),
            ({"ask_id": 5, "answer": "x"}, "ask_id"),
            ({"ask_id": self.pending.ask_id}, "answer is missing"),
            ({"ask_id": self.pending.ask_id, "answer": {"a": 1}}, "answer must be a string"),
            (b"\xff\xfe", "not JSON"),
        ]
        for body, says in cases:
            status, reply = await self.post(body)
            self.assertEqual(status, 400, body)
            self.assertIn(says, reply["error"])
        self.assertIsNone(self.pending.answer)

    async def test_body_over_one_mib_is_413_without_reading_it_all(self):
        huge = json.dumps({"ask_id": self.pending.ask_id, "answer": "x" * (8 * 1024 * 1024)}).encode()
        headers = {SECRET_HEADER: self.h.tap.secret}
        declared = standins.FakeRequest(huge, headers)
        self.assertEqual((await self.route(declared)).status, 413)
        self.assertEqual(declared.content.bytes_read, 0)
        # no Content-Length (chunked upload): counted while reading, stops past the limit
        chunked = standins.FakeRequest(huge, headers, content_length=None)
        self.assertEqual((await self.route(chunked)).status, 413)
        self.assertLess(chunked.content.bytes_read, 1024 * 1024 + 65536)
        just_over = json.dumps({"ask_id": self.pending.ask_id, "answer": "x" * (1024 * 1024)}).encode()
        self.assertEqual((await self.post(just_over))[0], 413)
        self.assertIsNone(self.pending.answer)
        just_fits = json.dumps({"ask_id": self.pending.ask_id, "answer": "y" * 1000}).encode()
        self.assertEqual((await self.post(just_fits, content_length=None))[0], 200)

    async def test_unknown_ask_is_409_unknown(self):
        self.assertEqual(await self.answer("no-such-ask", "x"), (409, {"accepted": False, "reason": "unknown"}))


class NodeDefinitionTests(unittest.TestCase):
    def test_mappings_and_outputs(self):
        self.assertEqual(set(NODE_CLASS_MAPPINGS), {"Bus Publish", "Bus Ask"})
        self.assertTrue(BusPublish.OUTPUT_NODE)
        self.assertEqual(BusAsk.RETURN_NAMES, ("answer", "answer_json"))
        self.assertEqual(BusAsk.RETURN_TYPES[0], "STRING")
        required = BusAsk.INPUT_TYPES()["required"]
        self.assertEqual(required["timeout_seconds"][1]["default"], 60.0)
        self.assertEqual(required["on_timeout"][0], ["error", "default"])
        self.assertIn("image", BusPublish.INPUT_TYPES()["optional"])

    def test_answer_json_links_to_any_input_type(self):
        """ComfyUI validates a link with ``not received != expected``."""
        for expected in ("DICT", "LIST", "STRING", "JSON", "*"):
            self.assertTrue(not ANY != expected)
        self.assertEqual(json.dumps(BusAsk.RETURN_TYPES), '["STRING", "*"]')

    def test_nodes_never_come_from_cache(self):
        a, b = BusAsk.IS_CHANGED(), BusAsk.IS_CHANGED()
        self.assertNotEqual(a, b)
        self.assertNotEqual(BusPublish.IS_CHANGED(), BusPublish.IS_CHANGED())


if __name__ == "__main__":
    unittest.main()
