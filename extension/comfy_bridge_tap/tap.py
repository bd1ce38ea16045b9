"""The tap: lets a bridge see every prompt, whoever queued it.

ComfyUI sends execution events only to the socket whose client id queued the
prompt, and sends none at all for a prompt queued without a client id. A socket
whose first message is ``feature_flags`` with ``"comfy_bridge_tap": true`` is a
*tap*; this module wraps a few of ComfyUI's functions so that

* every message ComfyUI sends to one particular non-tap socket (text or binary)
  is sent unchanged to every tap as well, except the per-connection handshake
  (the connect-time ``status`` with ``sid``, the ``feature_flags`` reply, and the
  reconnect hint ``executing`` without ``prompt_id``);
* for a prompt queued without a client id, the events ComfyUI would have sent to
  its submitter (``execution_start``, ``execution_cached``, ``executing``,
  ``executed``, ``execution_success``, ``execution_error`` and the final
  ``executing`` with node null) go to the taps; ``progress``, ``progress_state``,
  previews and ``execution_interrupted`` are broadcast by ComfyUI itself then, so
  the taps already get them;
* the server feature flags (``feature_flags`` reply, ``GET /features``) carry
  ``"comfy_bridge_tap": VERSION``, and each tap gets ``comfy_bridge.hello`` with
  the per-start secret of the answer route right after its flags reply.

Broadcasts and messages aimed at a tap are not mirrored. The tap only adds
sends: the original call always runs first and its result and exceptions are
untouched; any exception inside the tap is logged once and swallowed.

What is wrapped (same shape on ComfyUI 0.3.64 and later): the instance's
``send_json`` and ``send_bytes``, ``PromptExecutor.add_message``, the module
function ``execution.execute`` (given a stand-in server for prompts without a
client id, so its guarded sends reach the taps) and ``PromptQueue.task_done``.
"""

import inspect
import logging
import threading

from . import asks
from .version import ANSWER_ROUTE, ASK, ASK_DONE, FEATURE_FLAG, HELLO, MESSAGE_PREFIX, SECRET_HEADER, VERSION

log = logging.getLogger("comfy_bridge_tap")


class _ToTaps:
    """The ``sid`` of a message meant for every tap socket.

    Such messages travel through ComfyUI's own send queue (``send_sync``), so
    they keep their order with everything else, and are fanned out to the taps
    connected when the message is written."""

    def __repr__(self):
        return "<comfy_bridge_tap: all taps>"


TO_TAPS = _ToTaps()

#: Events that ComfyUI's ``execute`` sends only when the prompt has a client id.
_GUARDED_IN_EXECUTE = frozenset(("executing", "executed"))


def _split_send_args(args, kwargs):
    """(event, data, sid) from a send_json / send_bytes call."""
    event = args[0] if len(args) > 0 else kwargs.get("event")
    data = args[1] if len(args) > 1 else kwargs.get("data")
    sid = args[2] if len(args) > 2 else kwargs.get("sid")
    return event, data, sid


def is_handshake(event, data):
    """Messages ComfyUI sends a socket because it connected, not because
    something happened: never mirrored."""
    if event == "feature_flags":
        return True
    if isinstance(data, dict):
        if event == "status" and "sid" in data:
            return True
        if event == "executing" and "prompt_id" not in data:
            return True
    return False


def should_mirror(event, data):
    """Whether a message sent to one non-tap socket is copied to the taps."""
    if isinstance(event, str) and event.startswith(MESSAGE_PREFIX):
        return False
    return not is_handshake(event, data)


class _OnceLog:
    """Logs the first failure of each place with its traceback, later ones at debug."""

    def __init__(self):
        self._seen = set()
        self._lock = threading.Lock()

    def failed(self, where, exc):
        with self._lock:
            first = where not in self._seen
            self._seen.add(where)
        if first:
            log.warning(
                "comfy_bridge_tap: %s failed; ComfyUI is unaffected (logged once): %r",
                where,
                exc,
                exc_info=(type(exc), exc, exc.__traceback__),
            )
        else:
            log.debug("comfy_bridge_tap: %s failed again: %r", where, exc)


class _TapsClientServer:
    """What ``execution.execute`` sees as the server while a prompt without a
    client id runs and a tap is connected.

    Its ``client_id`` is TO_TAPS, so ``execute`` sends ``executing`` and
    ``executed``; those go to the taps. Anything else it sends with that id is
    broadcast, exactly as ComfyUI did with client id None. ``last_node_id`` is
    kept here, so the real server's stays as ComfyUI left it; every other
    attribute is the real server's."""

    def __init__(self, real):
        object.__setattr__(self, "_real", real)
        object.__setattr__(self, "client_id", TO_TAPS)
        object.__setattr__(self, "last_node_id", getattr(real, "last_node_id", None))

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_real"), name)

    def __setattr__(self, name, value):
        if name in ("client_id", "last_node_id"):
            object.__setattr__(self, name, value)
        else:
            setattr(object.__getattribute__(self, "_real"), name, value)

    def send_sync(self, event, data, sid=None):
        if sid is TO_TAPS and event not in _GUARDED_IN_EXECUTE:
            sid = None
        object.__getattribute__(self, "_real").send_sync(event, data, sid)


class Tap:
    """Everything the extension adds to one running PromptServer."""

    def __init__(self, server=None, registry=None, secret=None, model_management=None, image_saver=None):
        self.server = server
        self.registry = registry if registry is not None else asks.AskRegistry()
        self.secret = secret if secret is not None else asks.new_secret()
        self.model_management = model_management
        #: callable(image) -> {"filename", "subfolder", "type": "temp"}
        self.image_saver = image_saver
        self.errors = _OnceLog()
        self._taps = {}
        self._taps_lock = threading.Lock()
        self._send_json = None
        self._send_bytes = None
        self.installed = []

    # ----------------------------------------------------------------- taps

    def tap_sids(self):
        """Ids of the tap sockets connected now (any thread)."""
        server = self.server
        if server is None:
            return []
        sockets = server.sockets
        live = []
        with self._taps_lock:
            for sid, ws in list(self._taps.items()):
                if sockets.get(sid) is ws:
                    live.append(sid)
                else:
                    # closed, or the id now belongs to a newer socket
                    del self._taps[sid]
        return live

    def has_taps(self):
        return bool(self.tap_sids())

    def is_tap(self, sid):
        server = self.server
        with self._taps_lock:
            ws = self._taps.get(sid)
        return ws is not None and server is not None and server.sockets.get(sid) is ws

    def _flags_ask_for_tap(self, sid):
        metadata = getattr(self.server, "sockets_metadata", None)
        if not isinstance(metadata, dict):
            return False
        entry = metadata.get(sid)
        flags = entry.get("feature_flags") if isinstance(entry, dict) else None
        return isinstance(flags, dict) and flags.get(FEATURE_FLAG) is True

    def send_to_taps(self, event, data):
        """Queue a message for every tap (thread-safe, keeps ComfyUI's order).
        Without a server this does nothing."""
        server = self.server
        if server is None:
            return
        server.send_sync(event, data, TO_TAPS)

    # -------------------------------------------------------------- install

    def install(self, execution=None, feature_flags=None, web=None):
        """Wrap what exists; each step is independent and guarded."""
        server = self.server
        if getattr(server, "_comfy_bridge_tap", None) is not None:
            log.warning("comfy_bridge_tap: already installed on this server; skipped")
            return self
        steps = [
            ("sends", lambda: self._wrap_sends()),
            ("feature flags", lambda: self._announce(feature_flags)),
            ("executor", lambda: self._wrap_executor(execution)),
            ("answer route", lambda: self._add_route(web)),
        ]
        for name, step in steps:
            try:
                if step():
                    self.installed.append(name)
            except Exception as exc:  # never break ComfyUI's start
                self.errors.failed("install " + name, exc)
        try:
            server._comfy_bridge_tap = self
        except Exception as exc:
            self.errors.failed("install marker", exc)
        log.info("comfy_bridge_tap %s: installed %s", VERSION, ", ".join(self.installed) or "nothing")
        return self

    def _announce(self, feature_flags):
        flags = getattr(feature_flags, "SERVER_FEATURE_FLAGS", None)
        if not isinstance(flags, dict):
            log.warning("comfy_bridge_tap: this ComfyUI has no server feature flags; not announced")
            return False
        flags[FEATURE_FLAG] = VERSION
        return True

    def _wrap_sends(self):
        server = self.server
        if not isinstance(getattr(server, "sockets_metadata", None), dict):
            log.warning("comfy_bridge_tap: this ComfyUI does not negotiate feature flags; no socket can become a tap")
        self._send_json = server.send_json
        self._send_bytes = server.send_bytes
        tap = self

        def mirrored(original, what):
            """`original` (send_json or send_bytes), then the same message to the taps."""

            async def send(*args, **kwargs):
                event, data, sid = _split_send_args(args, kwargs)
                if sid is TO_TAPS:
                    await tap._fan_out(original, event, data)
                    return None
                result = await original(*args, **kwargs)
                try:
                    await tap._after_send(original, event, data, sid)
                except Exception as exc:
                    tap.errors.failed(what, exc)
                return result

            return send

        send_json = mirrored(self._send_json, "mirror text")
        send_bytes = mirrored(self._send_bytes, "mirror binary")

        server.send_json = send_json
        server.send_bytes = send_bytes
        return True

    async def _fan_out(self, original, event, data):
        for sid in self.tap_sids():
            try:
                await original(event, data, sid)
            except Exception as exc:
                self.errors.failed("send to tap", exc)

    async def _after_send(self, original, event, data, sid):
        if sid is None:
            return
        if event == "feature_flags" and original is self._send_json and self._flags_ask_for_tap(sid):
            await self._welcome(sid)
            return
        if not should_mirror(event, data) or self.is_tap(sid):
            return
        where = "mirror text" if original is self._send_json else "mirror binary"
        for tap_sid in self.tap_sids():
            if tap_sid != sid:
                try:
                    await original(event, data, tap_sid)
                except Exception as exc:  # one broken tap must not starve the others
                    self.errors.failed(where, exc)

    async def _welcome(self, sid):
        """Runs right after ComfyUI answered a tap's feature flags."""
        ws = self.server.sockets.get(sid)
        if ws is None:
            return
        with self._taps_lock:
            self._taps[sid] = ws
        log.info("comfy_bridge_tap: tap connected (%s)", sid)
        await self._send_json(HELLO, {"version": VERSION, "secret": self.secret}, sid)
        # an ask that started before this tap connected is still waiting for it
        for ask in self.registry.pending():
            await self._send_json(ASK, ask.message(), sid)

    def _wrap_executor(self, execution):
        if execution is None:
            return False
        tap = self
        done = False

        executor = getattr(execution, "PromptExecutor", None)
        add_message = getattr(executor, "add_message", None)
        if add_message is not None:

            def wrapped_add_message(executor_self, *args, **kwargs):
                result = add_message(executor_self, *args, **kwargs)
                try:
                    tap._after_add_message(executor_self, args, kwargs)
                except Exception as exc:
                    tap.errors.failed("lifecycle event", exc)
                return result

            wrapped_add_message.__wrapped__ = add_message
            executor.add_message = wrapped_add_message
            done = True
        else:
            log.warning(
                "comfy_bridge_tap: PromptExecutor.add_message not found; "
                "no lifecycle events for prompts without a client id"
            )

        execute = getattr(execution, "execute", None)
        if execute is not None:
            if inspect.iscoroutinefunction(execute):

                async def wrapped_execute(server, *args, **kwargs):
                    return await execute(tap._server_for_execute(server), *args, **kwargs)

            else:

                def wrapped_execute(server, *args, **kwargs):
                    return execute(tap._server_for_execute(server), *args, **kwargs)

            wrapped_execute.__wrapped__ = execute
            execution.execute = wrapped_execute
            done = True
        else:
            log.warning(
                "comfy_bridge_tap: execution.execute not found; no executing/executed for prompts without a client id"
            )

        queue = getattr(execution, "PromptQueue", None)
        task_done = getattr(queue, "task_done", None)
        if task_done is not None:

            def wrapped_task_done(queue_self, item_id, *args, **kwargs):
                prompt_id = None
                try:
                    item = queue_self.currently_running.get(item_id)
                    prompt_id = item[1] if item is not None else None
                except Exception as exc:
                    tap.errors.failed("prompt end", exc)
                result = task_done(queue_self, item_id, *args, **kwargs)
                try:
                    tap._after_task_done(queue_self, prompt_id)
                except Exception as exc:
                    tap.errors.failed("prompt end", exc)
                return result

            wrapped_task_done.__wrapped__ = task_done
            queue.task_done = wrapped_task_done
            done = True
        return done

    def _after_add_message(self, executor_self, args, kwargs):
        event = args[0] if len(args) > 0 else kwargs.get("event")
        data = args[1] if len(args) > 1 else kwargs.get("data")
        broadcast = args[2] if len(args) > 2 else kwargs.get("broadcast", False)
        server = executor_self.server
        if server is not self.server or server.client_id is not None or broadcast:
            return
        if not self.has_taps():
            return
        # add_message stamps the data; send what ComfyUI recorded for history
        messages = getattr(executor_self, "status_messages", None)
        if messages and messages[-1][0] == event:
            data = messages[-1][1]
        self.send_to_taps(event, data)

    def _server_for_execute(self, server):
        try:
            if server is self.server and server.client_id is None and self.has_taps():
                return _TapsClientServer(server)
        except Exception as exc:
            self.errors.failed("executing event", exc)
        return server

    def _after_task_done(self, queue_self, prompt_id):
        if prompt_id is None:
            return
        for ask in self.registry.close_prompt(prompt_id):
            # the node always closes its own ask; this only catches a stray one
            self.send_to_taps(ASK_DONE, ask.done_message(asks.FAILED))
        server = getattr(queue_self, "server", None)
        if server is self.server and server.client_id is None and self.has_taps():
            # main.py sends this to the submitter right after task_done
            self.send_to_taps("executing", {"node": None, "prompt_id": prompt_id})

    def _add_route(self, web):
        routes = getattr(self.server, "routes", None)
        if web is None or routes is None:
            log.warning("comfy_bridge_tap: no route table; Bus Ask answers cannot arrive")
            return False
        tap = self

        async def answer_route(request):
            try:
                status, body = await tap._answer(request)
            except Exception as exc:
                tap.errors.failed("answer route", exc)
                status, body = 500, {"accepted": False, "reason": "error", "error": "internal error"}
            return web.json_response(body, status=status)

        routes.post(ANSWER_ROUTE)(answer_route)
        return True

    async def _answer(self, request):
        given = request.headers.get(SECRET_HEADER)
        if not asks.secret_matches(self.secret, given):
            return asks.answer_reply(self.registry, self.secret, given, b"")
        body = await _read_limited(request, asks.MAX_ANSWER_BODY_BYTES)
        return asks.answer_reply(self.registry, self.secret, given, body)

    # ------------------------------------------------------------ for nodes

    def current_ids(self, unique_id=None):
        """(prompt_id, node_id) of the node running in this thread."""
        prompt_id = None
        node_id = unique_id
        try:
            from comfy_execution.utils import get_executing_context  # ComfyUI >= 0.3.4x

            context = get_executing_context()
            if context is not None:
                prompt_id = context.prompt_id
                if node_id is None:
                    node_id = context.node_id
        except Exception:
            pass
        if prompt_id is None and self.server is not None:
            prompt_id = getattr(self.server, "last_prompt_id", None)
        return prompt_id, None if node_id is None else str(node_id)

    def interrupted(self):
        mm = self.model_management
        return mm is not None and bool(mm.processing_interrupted())

    def raise_interrupt(self):
        """Raise ComfyUI's own interrupt exception, clearing the flag as a node
        start would."""
        mm = self.model_management
        mm.throw_exception_if_processing_interrupted()
        raise mm.InterruptProcessingException()


async def _read_limited(request, limit):
    """The request body, or None when it is longer than ``limit`` bytes."""
    length = getattr(request, "content_length", None)
    if length is not None and length > limit:
        return None
    content = request.content
    chunks = []
    size = 0
    while True:
        chunk = await content.read(65536)
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


_current = None
_current_lock = threading.Lock()


def current():
    """The installed Tap, or a server-less one (nodes still work, no sends)."""
    global _current
    with _current_lock:
        if _current is None:
            _current = Tap()
        return _current


def set_current(tap):
    global _current
    with _current_lock:
        _current = tap


def install(server, execution=None, feature_flags=None, web=None, model_management=None, image_saver=None):
    """Install on ``server`` (a PromptServer or a stand-in) and make it current."""
    tap = Tap(server=server, model_management=model_management, image_saver=image_saver)
    tap.install(execution=execution, feature_flags=feature_flags, web=web)
    set_current(tap)
    return tap


def _preview_image_saver(image):
    """Save the first image of a batch as a PNG in ComfyUI's temp folder, the
    way PreviewImage does, and return its ``/view`` reference."""
    import nodes as comfy_nodes  # ComfyUI's nodes.py

    saved = comfy_nodes.PreviewImage().save_images(image[0:1], filename_prefix="comfy_bridge")
    ref = saved["ui"]["images"][0]
    return {"filename": ref["filename"], "subfolder": ref["subfolder"], "type": ref["type"]}


def install_into_comfyui():
    """Called on import by ComfyUI; does nothing outside ComfyUI."""
    try:
        import server as comfy_server  # ComfyUI's server.py
    except ImportError:
        return None
    instance = getattr(getattr(comfy_server, "PromptServer", None), "instance", None)
    if instance is None:
        return None
    try:
        import execution
    except ImportError:
        execution = None
    try:
        from comfy_api import feature_flags
    except ImportError:
        feature_flags = None
    try:
        import comfy.model_management as model_management
    except ImportError:
        model_management = None
    try:
        from aiohttp import web
    except ImportError:
        web = None
    return install(
        instance,
        execution=execution,
        feature_flags=feature_flags,
        web=web,
        model_management=model_management,
        image_saver=_preview_image_saver,
    )
