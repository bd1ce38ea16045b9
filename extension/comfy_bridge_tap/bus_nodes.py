"""``Bus Publish`` and ``Bus Ask``: a running workflow talks to the bus.

Both nodes send their messages only to tap sockets (the bridge), never to the
browser and never as broadcasts. Publish never blocks. Ask blocks the worker
thread that runs the node (never ComfyUI's event loop) until the first answer
arrives over ``POST /comfy_bridge/answer``, its timeout passes, or ComfyUI is
interrupted (checked every 50 ms).
"""

from . import asks
from . import tap as _tap
from .version import ASK, ASK_DONE, PUBLISH

CATEGORY = "comfy_bridge"


class AnyType(str):
    """A type that ComfyUI's link validation accepts for any input.

    ``validate_node_input`` first checks ``not received_type != input_type``
    (its documented ``__ne__`` hook), and the frontend treats ``"*"`` as a
    wildcard, so ``answer_json`` can feed a node that takes a dict, a list or
    any custom type. A custom ``"JSON"`` type would link to no core node."""

    def __ne__(self, other):
        return False

    __hash__ = str.__hash__


ANY = AnyType("*")


def _subject(subject):
    if not isinstance(subject, str) or not subject.strip():
        raise ValueError("subject must not be empty")
    return subject.strip()


class BusPublish:
    """Publish ``payload`` (JSON when it parses as JSON) on ``flow/<subject>``,
    with an optional image. A no-op without a bridge; never waits."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "subject": ("STRING", {"default": "status", "tooltip": "One or more /-separated levels under flow/."}),
                "payload": (
                    "STRING",
                    {
                        "default": "{}",
                        "multiline": True,
                        "tooltip": "Sent as JSON when it parses as JSON, else as text.",
                    },
                ),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "The first image of the batch is sent as a PNG."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ()
    FUNCTION = "publish"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = "Publishes a message to MQTT/NATS through comfy-bridge (needs the bridge connected with the tap)."

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # publish on every run, never from cache

    def publish(self, subject, payload, image=None, unique_id=None):
        tap = _tap.current()
        subject = _subject(subject)
        if not tap.has_taps():
            return {"ui": {}}
        prompt_id, node_id = tap.current_ids(unique_id)
        data = {
            "prompt_id": prompt_id,
            "node_id": node_id,
            "subject": subject,
            "payload": asks.parse_payload(payload),
        }
        ui = {}
        if image is not None and tap.image_saver is not None:
            ref = tap.image_saver(image)
            data["image"] = ref
            ui = {"images": [ref]}
        tap.send_to_taps(PUBLISH, data)
        return {"ui": ui}


class BusAsk:
    """Ask a question on ``ask/<subject>`` and wait for the first answer."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "subject": ("STRING", {"default": "prompt", "tooltip": "One or more /-separated levels under ask/."}),
                "payload": (
                    "STRING",
                    {"default": "{}", "multiline": True, "tooltip": "The question; JSON when it parses as JSON."},
                ),
                "timeout_seconds": ("FLOAT", {"default": 60.0, "min": 0.1, "max": 86400.0, "step": 0.1}),
                "on_timeout": (["error", "default"], {"default": "error"}),
                "default": (
                    "STRING",
                    {"default": "", "multiline": True, "tooltip": "Answer used when on_timeout is default."},
                ),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "Sent with the question (the first image of the batch, as a PNG)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("STRING", ANY)
    RETURN_NAMES = ("answer", "answer_json")
    FUNCTION = "ask"
    CATEGORY = CATEGORY
    DESCRIPTION = "Asks on MQTT/NATS through comfy-bridge and waits for the answer (interruptible, with a timeout)."

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # ask again on every run

    def ask(self, subject, payload, timeout_seconds, on_timeout, default, image=None, unique_id=None):
        tap = _tap.current()
        subject = _subject(subject)
        timeout_seconds = float(timeout_seconds)
        prompt_id, node_id = tap.current_ids(unique_id)
        ask = tap.registry.open(prompt_id, node_id, subject, asks.parse_payload(payload), timeout_seconds)
        if image is not None and tap.image_saver is not None:
            ask.image = tap.image_saver(image)
        outcome = asks.FAILED
        try:
            tap.send_to_taps(ASK, ask.message())
            outcome = tap.registry.wait(ask, timeout_seconds, tap.interrupted)
        finally:
            tap.registry.close(ask.ask_id)
            tap.send_to_taps(ASK_DONE, ask.done_message(outcome))
        if outcome == asks.ANSWERED:
            return (ask.answer, asks.parse_payload(ask.answer))
        if outcome == asks.INTERRUPTED:
            tap.raise_interrupt()
        if on_timeout == "default":
            return (default, asks.parse_payload(default))
        raise TimeoutError("Bus Ask: no answer on ask/%s within %g s (ask %s)" % (subject, timeout_seconds, ask.ask_id))


NODE_CLASS_MAPPINGS = {
    "Bus Publish": BusPublish,
    "Bus Ask": BusAsk,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "Bus Publish": "Bus Publish",
    "Bus Ask": "Bus Ask",
}
