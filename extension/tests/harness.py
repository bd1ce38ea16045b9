"""A stand-in ComfyUI with (or without) the extension installed, for the tests."""

import asyncio
import json

from comfy_bridge_tap import tap as tap_module

from . import standins

BROWSER_FLAGS = {"supports_preview_metadata": True, "supports_manager_v4_ui": True}
TAP_FLAGS = {"supports_preview_metadata": True, "comfy_bridge_tap": True}

# a node with progress and previews, then an output node
NODES = [
    {"id": "2", "steps": 2, "preview": True},
    {"id": "4", "ui": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}]}},
]


class Harness:
    def __init__(self, with_tap=True):
        self.loop = asyncio.get_running_loop()
        self.feature_flags = standins.make_feature_flags()
        self.execution = standins.make_execution()
        self.model_management = standins.make_model_management()
        self.server = standins.PromptServer(self.loop, self.feature_flags, self.execution)
        self.saved_images = []
        self.tap = None
        if with_tap:
            self.tap = tap_module.install(
                self.server,
                execution=self.execution,
                feature_flags=self.feature_flags,
                web=standins.web,
                model_management=self.model_management,
                image_saver=self._save_image,
            )

    def _save_image(self, image):
        self.saved_images.append(image)
        return {"filename": "comfy_bridge_temp_x_00001_.png", "subfolder": "", "type": "temp"}

    async def socket(self, sid, flags=None, first_text=None):
        sid, ws = await self.server.connect(sid)
        if first_text is not None:
            await self.server.receive(sid, ws, first_text)
        if flags is not None:
            await self.server.receive(sid, ws, json.dumps({"type": "feature_flags", "data": flags}))
        await self.server.drain()
        return ws

    async def browser(self, sid="browser"):
        return await self.socket(sid, BROWSER_FLAGS)

    async def bridge(self, sid="bridge"):
        return await self.socket(sid, TAP_FLAGS)

    async def run_prompt(self, prompt_id, client_id=None, nodes=NODES):
        extra = {} if client_id is None else {"client_id": client_id}
        await self.loop.run_in_executor(None, standins.worker_run, self.server, self.execution, prompt_id, extra, nodes)
        await self.server.drain()

    def close(self):
        tap_module.set_current(None)
        standins.PromptServer.instance = None


def since(ws, start):
    """Frames a socket got after index ``start``."""
    return ws.frames[start:]


def kinds(frames):
    """A readable summary: text types, and binary frames as ('bin', type)."""
    out = []
    for kind, frame in frames:
        if kind == "text":
            out.append(frame["type"])
        else:
            out.append(("bin", int.from_bytes(frame[:4], "big")))
    return out
