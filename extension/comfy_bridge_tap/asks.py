"""Pending ``Bus Ask`` questions and the answers the bridge posts for them.

Pure Python (no ComfyUI, no aiohttp), shared by the node that waits (ComfyUI's
worker thread) and the answer route (ComfyUI's event loop). The route only
looks up an ask and sets its event under a short lock; it never waits.
"""

import collections
import hmac
import json
import secrets
import threading
import time

#: At most this many asks wait at once; one more is refused with TooManyAsks.
MAX_PENDING_ASKS = 256
#: Largest answer request body accepted (413 above it).
MAX_ANSWER_BODY_BYTES = 1024 * 1024
#: How many ended ask ids are remembered so that an answer for them gets
#: ``late`` rather than ``unknown``.
ENDED_MEMORY = 4096
#: How often a waiting ask looks at ComfyUI's interrupt flag.
POLL_SECONDS = 0.05

ANSWERED = "answered"
TIMEOUT = "timeout"
INTERRUPTED = "interrupted"
FAILED = "failed"

ACCEPTED = "accepted"
LATE = "late"
UNKNOWN = "unknown"


class TooManyAsks(RuntimeError):
    """MAX_PENDING_ASKS asks are already waiting."""


def _reject_constant(name):
    raise ValueError(name)


def parse_payload(text):
    """The JSON value ``text`` holds, or ``text`` itself when it is not JSON.

    NaN and Infinity are not JSON, so such text stays a string."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        return text


def new_secret():
    """A per-process-start secret for the answer route."""
    return secrets.token_urlsafe(32)


def secret_matches(expected, given):
    """Constant-time comparison; a missing header never matches."""
    if not isinstance(given, str) or not given:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8"))


class Ask:
    """One question waiting for its first answer."""

    def __init__(self, ask_id, prompt_id, node_id, subject, payload, timeout_seconds):
        self.ask_id = ask_id
        self.prompt_id = prompt_id
        self.node_id = node_id
        self.subject = subject
        self.payload = payload
        self.timeout_seconds = timeout_seconds
        self.image = None
        self.answer = None
        self.event = threading.Event()

    def message(self):
        """Data of the ``comfy_bridge.ask`` message."""
        return {
            "ask_id": self.ask_id,
            "prompt_id": self.prompt_id,
            "node_id": self.node_id,
            "subject": self.subject,
            "payload": self.payload,
            "timeout_seconds": self.timeout_seconds,
            **({"image": self.image} if self.image is not None else {}),
        }

    def done_message(self, outcome):
        """Data of the ``comfy_bridge.ask_done`` message."""
        return {
            "ask_id": self.ask_id,
            "prompt_id": self.prompt_id,
            "node_id": self.node_id,
            "outcome": outcome,
        }


class AskRegistry:
    """Asks that wait, keyed by an unguessable id; the first answer wins."""

    def __init__(self, max_pending=MAX_PENDING_ASKS, ended_memory=ENDED_MEMORY):
        self._lock = threading.Lock()
        self._pending = {}
        self._ended = collections.OrderedDict()
        self._max_pending = max_pending
        self._ended_memory = ended_memory

    def open(self, prompt_id, node_id, subject, payload, timeout_seconds):
        with self._lock:
            if len(self._pending) >= self._max_pending:
                raise TooManyAsks("Bus Ask: %d asks are already waiting; refusing another" % len(self._pending))
            ask_id = secrets.token_urlsafe(16)
            while ask_id in self._pending or ask_id in self._ended:
                ask_id = secrets.token_urlsafe(16)
            ask = Ask(ask_id, prompt_id, node_id, subject, payload, timeout_seconds)
            self._pending[ask_id] = ask
            return ask

    def answer(self, ask_id, text):
        """ACCEPTED for the first answer of a waiting ask, LATE for an ask that
        ended or was already answered, UNKNOWN otherwise."""
        with self._lock:
            ask = self._pending.get(ask_id)
            if ask is None:
                return LATE if ask_id in self._ended else UNKNOWN
            if ask.answer is not None:
                return LATE
            ask.answer = text
            ask.event.set()
            return ACCEPTED

    def close(self, ask_id):
        """Forget a pending ask; answers for it get LATE from now on.
        Returns the ask, or None when it was not pending."""
        with self._lock:
            ask = self._pending.pop(ask_id, None)
            if ask is not None:
                self._ended[ask_id] = True
                while len(self._ended) > self._ended_memory:
                    self._ended.popitem(last=False)
            return ask

    def close_prompt(self, prompt_id):
        """Close every ask still pending for ``prompt_id`` (a safety net after a
        prompt ended); returns the asks closed."""
        with self._lock:
            ids = [a.ask_id for a in self._pending.values() if a.prompt_id == prompt_id]
        closed = []
        for ask_id in ids:
            ask = self.close(ask_id)
            if ask is not None:
                closed.append(ask)
        return closed

    def pending(self):
        """Asks still waiting for an answer (for a tap that connects late)."""
        with self._lock:
            return [a for a in self._pending.values() if a.answer is None]

    def __len__(self):
        with self._lock:
            return len(self._pending)

    @staticmethod
    def wait(ask, timeout_seconds, interrupted, poll_seconds=POLL_SECONDS, clock=time.monotonic):
        """Block the calling (worker) thread until ``ask`` is answered, the
        timeout passes or ``interrupted()`` turns true, checked every
        ``poll_seconds``. Returns ANSWERED, TIMEOUT or INTERRUPTED."""
        deadline = clock() + max(0.0, float(timeout_seconds))
        while True:
            if ask.event.is_set():
                return ANSWERED
            if interrupted():
                return INTERRUPTED
            left = deadline - clock()
            if left <= 0:
                # an answer that raced the deadline still counts
                return ANSWERED if ask.event.is_set() else TIMEOUT
            if ask.event.wait(min(poll_seconds, left)):
                return ANSWERED


def answer_reply(registry, secret, given_secret, body):
    """(HTTP status, JSON body) for ``POST /comfy_bridge/answer``.

    ``body`` is the raw request body, or None when it was over
    MAX_ANSWER_BODY_BYTES. Checks run in this order: secret (403), size (413),
    shape (400), then the ask (200 or 409)."""
    if not secret_matches(secret, given_secret):
        return 403, {"accepted": False, "reason": "forbidden", "error": "missing or wrong secret"}
    if body is None or len(body) > MAX_ANSWER_BODY_BYTES:
        return 413, {
            "accepted": False,
            "reason": "too_large",
            "error": "body over %d bytes" % MAX_ANSWER_BODY_BYTES,
        }
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return 400, {"accepted": False, "reason": "bad_request", "error": "body is not JSON"}
    if not isinstance(doc, dict):
        return 400, {"accepted": False, "reason": "bad_request", "error": "body is not a JSON object"}
    ask_id = doc.get("ask_id")
    if not isinstance(ask_id, str) or not ask_id:
        return 400, {"accepted": False, "reason": "bad_request", "error": "ask_id must be a non-empty string"}
    if "answer" not in doc:
        return 400, {"accepted": False, "reason": "bad_request", "error": "answer is missing"}
    answer = doc["answer"]
    if not isinstance(answer, str):
        return 400, {"accepted": False, "reason": "bad_request", "error": "answer must be a string"}
    verdict = registry.answer(ask_id, answer)
    if verdict == ACCEPTED:
        return 200, {"accepted": True}
    return 409, {"accepted": False, "reason": verdict}
