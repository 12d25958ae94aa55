"""A local Graph API server that behaves like Meta for the Conversions API and Custom Audiences.

Why: the Meta adapters (``etl.destinations.meta``) must be proven with the real facebook-business
SDK over a real socket (STYLE.md item 15), and ``--target sandbox`` needs a demo target that
never touches Meta. The contract it imitates is ``shared/reference/ad-platforms.md`` section B
(fields, limits, error codes) and ``shared/reference/stack.md`` section 5 (what the SDK sends on
the wire: form bodies, CAPI ``data`` as a JSON array of JSON-encoded events, ``access_token`` in
the query string). Behaviour worth knowing (docs/meta.md, "The sandbox"):

- One bad event rejects the whole CAPI request (code 100 with a subcode), as Meta does; event
  age is judged against ``sandbox.now`` (the wall clock only when ``now`` is None).
- Audience membership is keyed like ``etl.destinations.meta.member_key`` (the exact data row),
  sessions must run ``batch_seq`` 1, 2, ... and end with ``last_batch_flag``; ``usersreplace``
  swaps the membership when its session ends.
- Subcodes 2804003 (event too old; RudderStack's mapping), 1713230 (audience upload blocked;
  Meta) and 33 (unknown object; Graph) are real; subcodes 90000xx are the sandbox's own.

The sandbox's state, lifecycle, knobs and accessors are here; serving requests is
``etl.sandbox.meta_handler`` and the checks of what Meta refuses ``etl.sandbox.meta_checks``.

Everything it receives is kept in memory (``received``); it logs nothing, and the access token
is redacted from what it records.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from datetime import datetime
from http.server import ThreadingHTTPServer

from etl.sandbox.meta_checks import (
    MAX_AUDIENCE_ROWS,
    MAX_EVENTS_PER_REQUEST,
    SUBCODE_AUDIENCE_BLOCKED,
    SUBCODE_BAD_PAYLOAD,
    SUBCODE_EVENT_TOO_OLD,
    SUBCODE_FUTURE_EVENT,
    SUBCODE_INVALID_EVENT,
    SUBCODE_SESSION,
    SUBCODE_TOO_MANY,
    SUBCODE_UNKNOWN_OBJECT,
    GraphError,
)
from etl.sandbox.meta_handler import (
    AcceptedEvent,
    AudienceSession,
    GraphEndpoints,
    GraphHTTPHandler,
    ReceivedRequest,
    member_key,
)

# what other modules import from here (the checks and the request records live beside it)
__all__ = [
    "DEFAULT_ACCESS_TOKEN", "MAX_AUDIENCE_ROWS", "MAX_EVENTS_PER_REQUEST",
    "SUBCODE_AUDIENCE_BLOCKED", "SUBCODE_BAD_PAYLOAD", "SUBCODE_EVENT_TOO_OLD",
    "SUBCODE_FUTURE_EVENT", "SUBCODE_INVALID_EVENT", "SUBCODE_SESSION", "SUBCODE_TOO_MANY",
    "SUBCODE_UNKNOWN_OBJECT", "AcceptedEvent", "MetaSandbox", "ReceivedRequest", "member_key",
]  # fmt: skip

DEFAULT_ACCESS_TOKEN = "sandbox-token"
_THROTTLE_MESSAGES = {
    4: "Application request limit reached",
    17: "User request limit reached",
    32: "Page request limit reached",
    613: "Calls to this api have exceeded the rate limit.",
    80003: "There have been too many calls to this ad-account (custom audience). Wait a bit.",
    80004: "There have been too many calls to this ad-account (ads management). Wait a bit.",
}


class MetaSandbox(GraphEndpoints):
    """A Graph API on ``127.0.0.1:<free port>`` in a daemon thread; use as a context manager.

    Args:
        access_token: the only token it accepts; any other (e.g. ``"bad-token"``) gets code 190.
        app_secret: when set, ``appsecret_proof`` must be HMAC-SHA256(app_secret, token).
        now: the sandbox's clock for event-age checks (tests set it; None = wall clock).
        pixel_ids: when given, events to other ids get code 100/33 (unknown object).
        audience_ids: when given, reads and member edits of other ids get code 100/33.
    """

    def __init__(
        self,
        *,
        access_token: str = DEFAULT_ACCESS_TOKEN,
        app_secret: str | None = None,
        now: datetime | None = None,
        pixel_ids: set[str] | None = None,
        audience_ids: set[str] | None = None,
    ) -> None:
        self.access_token = access_token
        self.app_secret = app_secret
        self.now = now
        self.pixel_ids = pixel_ids
        self.audience_ids = audience_ids
        self.received: list[ReceivedRequest] = []
        self._accepted: list[AcceptedEvent] = []
        self._members: dict[str, dict[str, list[str]]] = {}
        self._sessions: dict[tuple[str, int], AudienceSession] = {}
        self._flagged: set[str] = set()
        self._status_471: set[str] = set()
        self._denied: set[str] = set()
        self._poisoned: dict[str, int] = {}
        self._faults: list[GraphError | None] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle

    def start(self) -> MetaSandbox:
        if self._server is not None:
            return self
        server = ThreadingHTTPServer(("127.0.0.1", 0), GraphHTTPHandler)
        server.daemon_threads = True
        server.sandbox = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="meta-sandbox", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> MetaSandbox:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL for ``api._session.GRAPH`` (``http://127.0.0.1:<port>``)."""
        if self._server is None:
            raise RuntimeError("the Meta sandbox is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # knobs

    def throttle_next(
        self,
        times: int = 1,
        *,
        code: int = 80003,
        regain_minutes: int = 1,
        subcode: int | None = None,
    ) -> None:
        """Answer the next ``times`` requests with a rate-limit error and a BUC usage header."""
        usage = {
            "1234567890": [
                {
                    "type": "custom_audience" if code == 80003 else "ads_management",
                    "call_count": 100,
                    "total_cputime": 40,
                    "total_time": 60,
                    "estimated_time_to_regain_access": regain_minutes,
                }
            ]
        }
        header = {"X-Business-Use-Case-Usage": json.dumps(usage)}
        message = _THROTTLE_MESSAGES.get(code, "Request limit reached")
        with self._lock:
            for _ in range(times):
                self._faults.append(GraphError(400, code, message, subcode, headers=header))

    def fail_next(self, times: int = 1, *, code: int = 2, http_status: int = 503, html: bool = False) -> None:
        """Answer the next ``times`` requests with a transient error (or an HTML gateway page)."""
        message = "Service temporarily unavailable" if code == 2 else "An unknown error occurred"
        with self._lock:
            for _ in range(times):
                self._faults.append(GraphError(http_status, code, message, transient=True, html=html))

    def refuse_next(
        self, code: int, *, subcode: int | None = None, message: str = "Invalid parameter", after: int = 0
    ) -> None:
        """Let ``after`` requests through, then answer one with permanent error ``code`` (HTTP 400)."""
        with self._lock:
            self._faults.extend([None] * after)
            self._faults.append(GraphError(400, code, message, subcode))

    def reject_event(self, event_id: str, *, subcode: int = SUBCODE_INVALID_EVENT) -> None:
        """Make any request carrying ``event_id`` fail whole (a check no adapter can pre-run)."""
        with self._lock:
            self._poisoned[event_id] = subcode

    def flag_audience(self, audience_id: str, *, status_471: bool = True) -> None:
        """Flag an audience as suggesting a health condition: edits fail with 100/1713230.

        ``status_471=False`` keeps ``operation_status`` at 200 (a flag raised between the
        adapter's status read and its upload).
        """
        with self._lock:
            self._flagged.add(audience_id)
            if status_471:
                self._status_471.add(audience_id)

    def deny(self, object_id: str) -> None:
        """Answer every request on ``object_id`` with permission error 200."""
        with self._lock:
            self._denied.add(object_id)

    # accessors

    def event_ids_received(self) -> Counter[str]:
        """How many times each ``event_id`` was accepted (tests assert exactly-once with it)."""
        with self._lock:
            return Counter(str(a.event.get("event_id")) for a in self._accepted)

    def accepted_events(self) -> list[AcceptedEvent]:
        with self._lock:
            return list(self._accepted)

    def audience_members(self, audience_id: str) -> frozenset[str]:
        """Current membership as member keys (``member_key(data_row)``)."""
        with self._lock:
            return frozenset(self._members.get(audience_id, {}))

    def requests_to(self, edge: str) -> list[ReceivedRequest]:
        """Received requests whose path ends with ``/<edge>`` (e.g. ``"events"``, ``"users"``)."""
        with self._lock:
            return [r for r in self.received if r.path.rstrip("/").endswith("/" + edge)]
