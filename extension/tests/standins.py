"""Small stand-ins for the parts of ComfyUI the extension touches.

They have the names and call shapes of ComfyUI 0.3.64's ``server.PromptServer``
(``sockets``, ``sockets_metadata``, ``send``, ``send_json``, ``send_bytes``,
``send_sync``, ``messages``, ``client_id``, ``last_node_id``, ``routes``),
``execution`` (``PromptExecutor.add_message``, module function ``execute``
whose first argument is the server, ``PromptQueue.task_done``),
``comfy_api.feature_flags`` and ``comfy.model_management``'s interrupt
functions, and they follow the delivery rules in
shared/comfyui/PROTOCOL.md section 3. Our own code, written for the tests.
"""

import asyncio
import json
import struct
import threading
import types
import uuid

FIXED_MS = 1760000000000
PREVIEW_IMAGE = 1
PREVIEW_IMAGE_WITH_METADATA = 4


class FakeWebSocket:
    """Records what the server wrote to it. ``fail_with`` makes writes raise."""

    def __init__(self, name):
        self.name = name
        self.frames = []
        self.fail_with = None
        self.fail_except = set()

    async def send_json(self, message):
        await asyncio.sleep(0)
        if self.fail_with is not None and message["type"] not in self.fail_except:
            raise self.fail_with
        # what the peer would parse from the text frame
        self.frames.append(("text", json.loads(json.dumps(message))))

    async def send_bytes(self, message):
        await asyncio.sleep(0)
        if self.fail_with is not None:
            raise self.fail_with
        self.frames.append(("binary", bytes(message)))

    def texts(self):
        return [m for kind, m in self.frames if kind == "text"]

    def types(self):
        return [m["type"] for m in self.texts()]

    def binaries(self):
        return [b for kind, b in self.frames if kind == "binary"]


class RouteTable:
    """What custom nodes use of aiohttp's RouteTableDef."""

    def __init__(self):
        self.handlers = {}

    def post(self, path):
        def register(handler):
            self.handlers[("POST", path)] = handler
            return handler

        return register

    def get(self, path):
        def register(handler):
            self.handlers[("GET", path)] = handler
            return handler

        return register


class FakeResponse:
    def __init__(self, body, status):
        self.body = body
        self.status = status


web = types.SimpleNamespace(json_response=lambda body, status=200: FakeResponse(body, status))


class _Content:
    def __init__(self, body, chunk):
        self._body = body
        self._chunk = chunk
        self.bytes_read = 0

    async def read(self, n=-1):
        n = min(n, self._chunk) if n > 0 else len(self._body)
        part, self._body = self._body[:n], self._body[n:]
        self.bytes_read += len(part)
        return part


class FakeRequest:
    """An aiohttp request as the answer route reads it."""

    def __init__(self, body=b"", headers=None, content_length="auto", chunk=4096):
        self.headers = dict(headers or {})
        self.content_length = len(body) if content_length == "auto" else content_length
        self.content = _Content(body, chunk)


def make_feature_flags():
    mod = types.ModuleType("feature_flags")
    mod.SERVER_FEATURE_FLAGS = {"supports_preview_metadata": True, "max_upload_size": 104857600}
    mod.get_server_features = lambda: mod.SERVER_FEATURE_FLAGS.copy()
    mod.supports_feature = lambda metadata, sid, name: (
        sid in metadata and metadata[sid].get("feature_flags", {}).get(name, False) is True
    )
    return mod


class InterruptProcessingException(Exception):
    pass


def make_model_management():
    mod = types.ModuleType("model_management")
    mod.InterruptProcessingException = InterruptProcessingException
    lock = threading.RLock()
    state = {"flag": False}

    def interrupt_current_processing(value=True):
        with lock:
            state["flag"] = value

    def processing_interrupted():
        with lock:
            return state["flag"]

    def throw_exception_if_processing_interrupted():
        with lock:
            if state["flag"]:
                state["flag"] = False
                raise InterruptProcessingException()

    mod.interrupt_current_processing = interrupt_current_processing
    mod.processing_interrupted = processing_interrupted
    mod.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    return mod


class PromptServer:
    """The delivery half of ComfyUI's PromptServer."""

    instance = None

    def __init__(self, loop, feature_flags, execution):
        PromptServer.instance = self
        self.loop = loop
        self.messages = asyncio.Queue()
        self.sockets = {}
        self.sockets_metadata = {}
        self.routes = RouteTable()
        self.last_node_id = None
        self.last_prompt_id = None
        self.client_id = None
        self.feature_flags = feature_flags
        self.prompt_queue = execution.PromptQueue(self)

    # --- the websocket handler, split at its awaits
    async def connect(self, sid="", name=None):
        ws = FakeWebSocket(name or sid or "anon")
        if sid:
            self.sockets.pop(sid, None)
        else:
            sid = uuid.uuid4().hex
        self.sockets[sid] = ws
        self.sockets_metadata[sid] = {"feature_flags": {}}
        ws.first_message = True
        await self.send("status", {"status": self.get_queue_info(), "sid": sid}, sid)
        if self.client_id == sid and self.last_node_id is not None:
            await self.send("executing", {"node": self.last_node_id}, sid)
        return sid, ws

    async def receive(self, sid, ws, text):
        """One text frame from the client (only the first JSON one counts)."""
        try:
            data = json.loads(text)
        except ValueError:
            return
        if ws.first_message and data.get("type") == "feature_flags":
            self.sockets_metadata[sid]["feature_flags"] = data.get("data", {})
            await self.send("feature_flags", self.feature_flags.get_server_features(), sid)
        ws.first_message = False

    def disconnect(self, sid):
        self.sockets.pop(sid, None)
        self.sockets_metadata.pop(sid, None)

    # --- sending
    def get_queue_info(self):
        return {"exec_info": {"queue_remaining": 0}}

    async def send(self, event, data, sid=None):
        if isinstance(data, (bytes, bytearray)):
            await self.send_bytes(event, data, sid)
        else:
            await self.send_json(event, data, sid)

    def encode_bytes(self, event, data):
        message = bytearray(struct.pack(">I", event))
        message.extend(data)
        return message

    async def send_bytes(self, event, data, sid=None):
        message = self.encode_bytes(event, data)
        if sid is None:
            for ws in list(self.sockets.values()):
                await _catch(ws.send_bytes, message)
        elif sid in self.sockets:
            await _catch(self.sockets[sid].send_bytes, message)

    async def send_json(self, event, data, sid=None):
        message = {"type": event, "data": data}
        if sid is None:
            for ws in list(self.sockets.values()):
                await _catch(ws.send_json, message)
        elif sid in self.sockets:
            await _catch(self.sockets[sid].send_json, message)

    def send_sync(self, event, data, sid=None):
        self.loop.call_soon_threadsafe(self.messages.put_nowait, (event, data, sid))

    def queue_updated(self):
        self.send_sync("status", {"status": self.get_queue_info()})

    async def drain(self):
        """Write everything queued so far, like publish_loop would."""
        idle = 0
        while idle < 3:
            await asyncio.sleep(0)
            if self.messages.empty():
                idle += 1
                continue
            idle = 0
            await self.send(*self.messages.get_nowait())


async def _catch(function, message):
    try:
        await function(message)
    except (ConnectionResetError, BrokenPipeError, ConnectionError):
        pass


def make_execution():
    """A fresh ``execution`` module (the tap patches it, so one per test)."""
    mod = types.ModuleType("execution")

    class PromptExecutor:
        def __init__(self, server):
            self.server = server
            self.status_messages = []
            self.success = True

        def add_message(self, event, data, broadcast):
            data = {**data, "timestamp": FIXED_MS}
            self.status_messages.append((event, data))
            if self.server.client_id is not None or broadcast:
                self.server.send_sync(event, data, self.server.client_id)

        async def execute_async(self, prompt_id, extra_data, nodes):
            if "client_id" in extra_data:
                self.server.client_id = extra_data["client_id"]
            else:
                self.server.client_id = None
            self.status_messages = []
            self.add_message("execution_start", {"prompt_id": prompt_id}, broadcast=False)
            self.add_message("execution_cached", {"nodes": [], "prompt_id": prompt_id}, broadcast=False)
            executed = []
            for node in nodes:
                outcome = await mod.execute(self.server, node, prompt_id)
                if outcome == "interrupted":
                    mes = {"prompt_id": prompt_id, "node_id": node["id"], "node_type": "T", "executed": executed}
                    self.add_message("execution_interrupted", mes, broadcast=True)
                    self.success = False
                    break
                if outcome == "error":
                    mes = {
                        "prompt_id": prompt_id,
                        "node_id": node["id"],
                        "node_type": "T",
                        "executed": executed,
                        "exception_message": "boom",
                        "exception_type": "RuntimeError",
                        "traceback": [],
                        "current_inputs": {},
                        "current_outputs": [],
                    }
                    self.add_message("execution_error", mes, broadcast=False)
                    self.success = False
                    break
                executed.append(node["id"])
            else:
                self.add_message("execution_success", {"prompt_id": prompt_id}, broadcast=False)
            self.server.last_node_id = None

    async def execute(server, node, prompt_id):
        """One node, with the sends and guards of ComfyUI's execute(); the
        progress and preview sends are those of main.py's progress hook, which
        uses the real server instance."""
        real = PromptServer.instance
        node_id = node["id"]
        if node.get("cached"):
            if server.client_id is not None:
                server.send_sync(
                    "executed",
                    {"node": node_id, "display_node": node_id, "output": node.get("ui"), "prompt_id": prompt_id},
                    server.client_id,
                )
            return "ok"
        if server.client_id is not None:
            server.last_node_id = node_id
            server.send_sync(
                "executing", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id}, server.client_id
            )
        if node.get("blocked"):
            mes = {
                "prompt_id": prompt_id,
                "node_id": node_id,
                "node_type": "T",
                "executed": [],
                "exception_message": "Execution Blocked: " + node["blocked"],
                "exception_type": "ExecutionBlocked",
                "traceback": [],
                "current_inputs": [],
                "current_outputs": [],
            }
            server.send_sync("execution_error", mes, server.client_id)
        for value in range(1, node.get("steps", 0) + 1):
            real.send_sync(
                "progress",
                {"value": value, "max": node["steps"], "prompt_id": prompt_id, "node": node_id},
                real.client_id,
            )
            if node.get("preview"):
                image = bytes([value]) * 8
                if real.feature_flags.supports_feature(
                    real.sockets_metadata, real.client_id, "supports_preview_metadata"
                ):
                    meta = json.dumps({"node_id": node_id, "prompt_id": prompt_id}).encode()
                    real.send_sync(
                        PREVIEW_IMAGE_WITH_METADATA, struct.pack(">I", len(meta)) + meta + image, real.client_id
                    )
                else:
                    real.send_sync(PREVIEW_IMAGE, struct.pack(">I", 1) + image, real.client_id)
        if node.get("interrupt"):
            return "interrupted"
        if node.get("error"):
            return "error"
        if node.get("ui") is not None and server.client_id is not None:
            server.send_sync(
                "executed",
                {"node": node_id, "display_node": node_id, "output": node["ui"], "prompt_id": prompt_id},
                server.client_id,
            )
        return "ok"

    class PromptQueue:
        def __init__(self, server):
            self.server = server
            self.currently_running = {}
            self.history = {}
            self.task_counter = 0

        def start(self, item):
            item_id = self.task_counter
            self.task_counter += 1
            self.currently_running[item_id] = item
            self.server.queue_updated()  # put
            self.server.queue_updated()  # get: the worker took it
            return item_id

        def task_done(self, item_id, history_result, status=None):
            prompt = self.currently_running.pop(item_id)
            self.history[prompt[1]] = {"prompt": prompt, "outputs": {}, "status": status}
            self.history[prompt[1]].update(history_result)
            self.server.queue_updated()

    mod.PromptExecutor = PromptExecutor
    mod.PromptQueue = PromptQueue
    mod.execute = execute
    return mod


def worker_run(server, execution, prompt_id, extra_data, nodes):
    """What main.py's prompt_worker does for one prompt (call in a thread)."""
    item_id = server.prompt_queue.start((0, prompt_id, {}, extra_data, []))
    server.last_prompt_id = prompt_id
    executor = execution.PromptExecutor(server)
    asyncio.run(executor.execute_async(prompt_id, extra_data, nodes))
    server.prompt_queue.task_done(item_id, {"outputs": {}, "meta": {}}, status=None)
    if server.client_id is not None:
        server.send_sync("executing", {"node": None, "prompt_id": prompt_id}, server.client_id)
