"""Version and wire names shared by the tap and the bus nodes."""

#: Announced as ``"comfy_bridge_tap": VERSION`` in ComfyUI's server feature flags
#: and in the ``comfy_bridge.hello`` message sent to tap sockets.
VERSION = "0.1.0"

#: Client feature flag (JSON ``true``) that makes a socket a tap, and the server
#: feature flag that carries VERSION.
FEATURE_FLAG = "comfy_bridge_tap"

#: Prefix of every message type this extension sends. Such messages go to tap
#: sockets only and are never mirrored.
MESSAGE_PREFIX = "comfy_bridge."

HELLO = "comfy_bridge.hello"
PUBLISH = "comfy_bridge.publish"
ASK = "comfy_bridge.ask"
ASK_DONE = "comfy_bridge.ask_done"

#: Route the bridge posts answers to (ComfyUI also serves it under ``/api``).
ANSWER_ROUTE = "/comfy_bridge/answer"
#: Header that must carry the per-start secret on ANSWER_ROUTE.
SECRET_HEADER = "X-Comfy-Bridge-Secret"
