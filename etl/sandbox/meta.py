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

Everything it receives is kept in memory (``received``); it logs nothing, and the access token
is redacted from what it records.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

DEFAULT_ACCESS_TOKEN = "sandbox-token"
MAX_EVENTS_PER_REQUEST = 1_000
MAX_AUDIENCE_ROWS = 10_000
SUBCODE_UNKNOWN_OBJECT = 33
SUBCODE_EVENT_TOO_OLD = 2804003
SUBCODE_AUDIENCE_BLOCKED = 1713230
SUBCODE_INVALID_EVENT = 9000001
SUBCODE_TOO_MANY = 9000002
SUBCODE_SESSION = 9000003
SUBCODE_FUTURE_EVENT = 9000004
SUBCODE_BAD_PAYLOAD = 9000005

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_FBC = re.compile(r"^fb\.\d\.\d{10,13}\.\S+$")
_FBP = re.compile(r"^fb\.\d\.\d{10,13}\.\d+$")
_VERSION = re.compile(r"^v\d+\.\d+$")
_HASHED_USER_KEYS = ("em", "ph", "fn", "ln", "ct", "st", "zp", "country", "ge", "db")
_CLEAR_USER_KEYS = ("external_id", "fbc", "fbp", "client_ip_address", "client_user_agent")
_ACTION_SOURCES = frozenset(
    {
        "email",
        "website",
        "app",
        "phone_call",
        "chat",
        "physical_store",
        "system_generated",
        "business_messaging",
        "other",
    }
)
_AUDIENCE_KEYS = frozenset(
    {
        "EMAIL",
        "PHONE",
        "FN",
        "LN",
        "FI",
        "GEN",
        "DOBY",
        "DOBM",
        "DOBD",
        "CT",
        "ST",
        "ZIP",
        "COUNTRY",
        "MADID",
        "EXTERN_ID",
        "LOOKALIKE_VALUE",
    }
)
_UNHASHED_AUDIENCE_KEYS = frozenset({"MADID", "EXTERN_ID", "LOOKALIKE_VALUE"})
_SINGLE_KEY_SCHEMAS = {"EMAIL_SHA256": "EMAIL", "PHONE_SHA256": "PHONE"}
_THROTTLE_MESSAGES = {
    4: "Application request limit reached",
    17: "User request limit reached",
    32: "Page request limit reached",
    613: "Calls to this api have exceeded the rate limit.",
    80003: "There have been too many calls to this ad-account (custom audience). Wait a bit.",
    80004: "There have been too many calls to this ad-account (ads management). Wait a bit.",
}


def member_key(data_row: list[str]) -> str:
    """Identity of one audience member row; must equal ``etl.destinations.meta.member_key``."""
    return hashlib.sha256(json.dumps(data_row, separators=(",", ":")).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ReceivedRequest:
    """One request as the sandbox saw it (``access_token`` values redacted to ``"<redacted>"``).

    ``auth`` says where the token travelled: ``"header"``, ``"query"``, ``"body"`` or ``"none"``.
    """

    method: str
    path: str
    query: dict[str, list[str]]
    form: dict[str, list[str]]
    auth: str
    status: int
    response: dict[str, Any]
    fbtrace_id: str


@dataclass(frozen=True)
class AcceptedEvent:
    pixel_id: str
    event: dict[str, Any]
    test_event_code: str | None
    fbtrace_id: str


@dataclass
class _Session:
    kind: str
    last_seq: int
    closed: bool
    staged: dict[str, list[str]] = field(default_factory=dict)


class _GraphError(Exception):
    def __init__(
        self,
        status: int,
        code: int,
        message: str,
        subcode: int | None = None,
        *,
        transient: bool = False,
        title: str | None = None,
        error_type: str = "OAuthException",
        headers: dict[str, str] | None = None,
        html: bool = False,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.subcode = status, code, message, subcode
        self.transient, self.title, self.error_type = transient, title, error_type
        self.headers = headers or {}
        self.html = html

    def body(self, fbtrace_id: str) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.error_type,
            "code": self.code,
        }
        if self.subcode is not None:
            error["error_subcode"] = self.subcode
        if self.transient:
            error["is_transient"] = True
        if self.title:
            error["error_user_title"] = self.title
            error["error_user_msg"] = self.title
        error["fbtrace_id"] = fbtrace_id
        return {"error": error}


def _invalid(
    message: str, subcode: int = SUBCODE_INVALID_EVENT, title: str | None = None
) -> _GraphError:
    return _GraphError(400, 100, f"Invalid parameter: {message}", subcode, title=title or message)


class MetaSandbox:
    """A Graph API on ``127.0.0.1:<free port>`` in a daemon thread; use as a context manager.

    Args:
        access_token: the only token it accepts; any other (e.g. ``"bad-token"``) gets code 190.
        app_secret: when set, ``appsecret_proof`` must be HMAC-SHA256(app_secret, token).
        now: the sandbox's clock for event-age checks (tests set it; None = wall clock).
        pixel_ids: when given, events to other ids get code 100/33 (unknown object).
    """

    def __init__(
        self,
        *,
        access_token: str = DEFAULT_ACCESS_TOKEN,
        app_secret: str | None = None,
        now: datetime | None = None,
        pixel_ids: set[str] | None = None,
    ) -> None:
        self.access_token = access_token
        self.app_secret = app_secret
        self.now = now
        self.pixel_ids = pixel_ids
        self.received: list[ReceivedRequest] = []
        self._accepted: list[AcceptedEvent] = []
        self._members: dict[str, dict[str, list[str]]] = {}
        self._sessions: dict[tuple[str, int], _Session] = {}
        self._flagged: set[str] = set()
        self._status_471: set[str] = set()
        self._denied: set[str] = set()
        self._poisoned: dict[str, int] = {}
        self._faults: list[_GraphError] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle

    def start(self) -> MetaSandbox:
        if self._server is not None:
            return self
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
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
                self._faults.append(_GraphError(400, code, message, subcode, headers=header))

    def fail_next(
        self, times: int = 1, *, code: int = 2, http_status: int = 503, html: bool = False
    ) -> None:
        """Answer the next ``times`` requests with a transient error (or an HTML gateway page)."""
        message = "Service temporarily unavailable" if code == 2 else "An unknown error occurred"
        with self._lock:
            for _ in range(times):
                self._faults.append(
                    _GraphError(http_status, code, message, transient=True, html=html)
                )

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

    # request handling (called from the server threads)

    def handle(
        self, method: str, raw_path: str, headers: dict[str, str], form: dict[str, list[str]]
    ) -> tuple[int, dict[str, Any] | str, dict[str, str]]:
        split = urlsplit(raw_path)
        query = parse_qs(split.query, keep_blank_values=True)
        fbtrace_id = "Sbx" + uuid.uuid4().hex[:16]
        auth = "none"
        html = False
        with self._lock:
            try:
                auth = self._authenticate(headers, query, form)
                if self._faults:
                    raise self._faults.pop(0)
                status, body = 200, self._route(method, split.path, query, form, fbtrace_id)
                extra: dict[str, str] = {}
            except _GraphError as err:
                status, body, extra, html = (
                    err.status,
                    err.body(fbtrace_id),
                    dict(err.headers),
                    err.html,
                )
            self.received.append(
                ReceivedRequest(
                    method=method,
                    path=split.path,
                    query=_redact(query),
                    form=_redact(form),
                    auth=auth,
                    status=status,
                    response=body,
                    fbtrace_id=fbtrace_id,
                )
            )
        extra["x-fb-trace-id"] = fbtrace_id
        if html:
            # a gateway page, as a load balancer in front of the Graph API sends it
            return status, "<html><body><h1>502 Bad Gateway</h1></body></html>", extra
        return status, body, extra

    def _authenticate(
        self, headers: dict[str, str], query: dict[str, list[str]], form: dict[str, list[str]]
    ) -> str:
        token, where = None, "none"
        header = headers.get("authorization", "")
        if header.split(" ", 1)[0].lower() in ("bearer", "oauth") and " " in header:
            token, where = header.split(" ", 1)[1].strip(), "header"
        elif "access_token" in query:
            token, where = query["access_token"][0], "query"
        elif "access_token" in form:
            token, where = form["access_token"][0], "body"
        if not token:
            raise _GraphError(400, 104, "An access token is required to request this resource.")
        if not hmac.compare_digest(token.encode(), self.access_token.encode()):
            raise _GraphError(400, 190, "Invalid OAuth access token - Cannot parse access token")
        if self.app_secret is not None:
            proof = (query.get("appsecret_proof") or form.get("appsecret_proof") or [""])[0]
            expected = hmac.new(
                self.app_secret.encode(), token.encode(), hashlib.sha256
            ).hexdigest()
            if not hmac.compare_digest(proof.encode(), expected.encode()):
                raise _GraphError(
                    400,
                    100,
                    "Invalid appsecret_proof provided in the API argument",
                    error_type="GraphMethodException",
                )
        return where

    def _route(
        self,
        method: str,
        path: str,
        query: dict[str, list[str]],
        form: dict[str, list[str]],
        fbtrace_id: str,
    ) -> dict[str, Any]:
        parts = [p for p in path.split("/") if p]
        if parts and _VERSION.match(parts[0]):
            parts = parts[1:]
        if not parts:
            raise _unknown_object(method, "")
        object_id = parts[0]
        if object_id in self._denied:
            raise _GraphError(403, 200, "(#200) Permissions error", error_type="OAuthException")
        if method == "POST" and (form.get("method") or [""])[0].lower() == "delete":
            method = "DELETE"
        edge = parts[1] if len(parts) == 2 else None
        if method == "GET" and len(parts) == 1:
            return self._read_object(object_id)
        if method == "POST" and edge == "events":
            return self._events(object_id, form, fbtrace_id)
        if edge == "users" and method in ("POST", "DELETE"):
            kind = "add" if method == "POST" else "remove"
            return self._audience(object_id, kind, {**query, **form})
        if edge == "usersreplace" and method == "POST":
            return self._audience(object_id, "replace", form)
        raise _unknown_object(method, object_id)

    def _read_object(self, object_id: str) -> dict[str, Any]:
        if object_id in self._status_471:
            status = {"code": 471, "description": "This audience suggests a health condition."}
        else:
            status = {"code": 200, "description": "Normal"}
        return {"id": object_id, "operation_status": status}

    # conversions API

    def _events(self, pixel_id: str, form: dict[str, list[str]], fbtrace_id: str) -> dict[str, Any]:
        if self.pixel_ids is not None and pixel_id not in self.pixel_ids:
            raise _unknown_object("POST", pixel_id)
        try:
            raw = json.loads(form["data"][0])
            if not isinstance(raw, list):
                raise ValueError
            events = [json.loads(item) if isinstance(item, str) else item for item in raw]
        except (KeyError, IndexError, ValueError):
            raise _invalid("data must be a JSON array of events", SUBCODE_BAD_PAYLOAD) from None
        if not events:
            raise _invalid("data must not be empty", SUBCODE_BAD_PAYLOAD)
        if len(events) > MAX_EVENTS_PER_REQUEST:
            raise _invalid("at most 1000 events per request", SUBCODE_TOO_MANY)
        now = (self.now or datetime.now(UTC)).timestamp()
        for event in events:
            self._check_event(event, now)
        test_code = _first(form, "test_event_code")
        for event in events:
            self._accepted.append(AcceptedEvent(pixel_id, event, test_code, fbtrace_id))
        return {"events_received": len(events), "messages": [], "fbtrace_id": fbtrace_id}

    def _check_event(self, event: Any, now: float) -> None:
        if not isinstance(event, dict):
            raise _invalid("each event must be an object")
        if not isinstance(event.get("event_name"), str) or not event["event_name"]:
            raise _invalid("event_name is required")
        event_time = event.get("event_time")
        if not isinstance(event_time, int) or isinstance(event_time, bool):
            raise _invalid("event_time must be a Unix timestamp in seconds")
        source = event.get("action_source")
        if source not in _ACTION_SOURCES:
            raise _invalid("action_source is missing or not supported")
        if event.get("event_id") in self._poisoned:
            raise _invalid("the event was rejected", self._poisoned[str(event["event_id"])])
        limit_days = 62 if source == "physical_store" else 7
        if now - event_time > limit_days * 86_400:
            raise _invalid(
                "event_time is too far in the past",
                SUBCODE_EVENT_TOO_OLD,
                "Event Timestamp Too Old",
            )
        if event_time > now + 60:
            raise _invalid("event_time is in the future", SUBCODE_FUTURE_EVENT)
        self._check_user_data(event.get("user_data"))
        custom = event.get("custom_data")
        if custom is not None:
            value, currency = custom.get("value"), custom.get("currency")
            if value is not None and (
                not isinstance(value, int | float)
                or isinstance(value, bool)
                or not math.isfinite(value)
            ):
                raise _invalid("custom_data.value must be a number")
            if currency is not None and not re.fullmatch(r"[A-Za-z]{3}", str(currency)):
                raise _invalid("custom_data.currency must be an ISO 4217 code")
        if event["event_name"] == "Purchase" and (
            not isinstance(custom, dict)
            or custom.get("value") is None
            or not custom.get("currency")
        ):
            raise _invalid("Purchase events require custom_data.value and custom_data.currency")
        self._check_ldu(event)

    @staticmethod
    def _check_user_data(user_data: Any) -> None:
        if not isinstance(user_data, dict) or not user_data:
            raise _invalid("user_data needs at least one customer information parameter")
        for key, value in user_data.items():
            if key in _HASHED_USER_KEYS:
                values = value if isinstance(value, list) else [value]
                if not values or not all(isinstance(v, str) and _HEX64.match(v) for v in values):
                    raise _invalid(f"user_data.{key} must be SHA-256 hex")
            elif key == "fbc":
                if not isinstance(value, str) or not _FBC.match(value):
                    raise _invalid("user_data.fbc is not fb.<n>.<ms>.<fbclid>")
            elif key == "fbp":
                if not isinstance(value, str) or not _FBP.match(value):
                    raise _invalid("user_data.fbp is not fb.<n>.<ms>.<random>")
            elif key not in _CLEAR_USER_KEYS:
                raise _invalid(f"user_data.{key} is not a customer information parameter")

    @staticmethod
    def _check_ldu(event: dict[str, Any]) -> None:
        options = event.get("data_processing_options")
        if options is None:
            return
        if not isinstance(options, list) or any(o != "LDU" for o in options):
            raise _invalid('data_processing_options must be [] or ["LDU"]')
        if options:
            if event.get("data_processing_options_country") not in (0, 1):
                raise _invalid("data_processing_options_country must be 0 or 1")
            if event.get("data_processing_options_state") not in (0, 1000):
                raise _invalid(
                    "data_processing_options_state is required (0 or 1000) without an IP"
                )

    # custom audiences

    def _audience(
        self, audience_id: str, kind: str, params: dict[str, list[str]]
    ) -> dict[str, Any]:
        if audience_id in self._flagged:
            raise _GraphError(
                400,
                100,
                "Audience Upload Blocked: this audience may suggest a health condition.",
                SUBCODE_AUDIENCE_BLOCKED,
                title="Audience Upload Blocked",
            )
        schema, rows = _parse_payload(params)
        session_id, session = self._session_step(audience_id, kind, params)
        invalid = 0
        accepted: dict[str, list[str]] = {}
        for row in rows:
            if _valid_row(schema, row):
                accepted[member_key(row)] = row
            else:
                invalid += 1
        members = self._members.setdefault(audience_id, {})
        if kind == "add":
            members.update(accepted)
        elif kind == "remove":
            for key in accepted:
                members.pop(key, None)
        else:
            assert session is not None
            session.staged.update(accepted)
            if session.closed:
                self._members[audience_id] = dict(session.staged)
        return {
            "audience_id": audience_id,
            "session_id": None if session_id is None else str(session_id),
            "num_received": len(rows),
            "num_invalid_entries": invalid,
            "invalid_entry_samples": {},
        }

    def _session_step(
        self, audience_id: str, kind: str, params: dict[str, list[str]]
    ) -> tuple[int | None, _Session | None]:
        raw = _first(params, "session")
        if raw is None:
            if kind == "replace":
                raise _invalid("usersreplace requires a session", SUBCODE_SESSION)
            return None, None
        try:
            spec = json.loads(raw)
            session_id, seq = int(spec["session_id"]), int(spec["batch_seq"])
            last = bool(spec.get("last_batch_flag", False))
        except (KeyError, TypeError, ValueError):
            raise _invalid("session needs session_id and batch_seq", SUBCODE_SESSION) from None
        key = (audience_id, session_id)
        current = self._sessions.get(key)
        if seq == 1:
            current = _Session(kind=kind, last_seq=0, closed=False)
            self._sessions[key] = current
        elif (
            current is None or current.closed or current.kind != kind or seq != current.last_seq + 1
        ):
            raise _invalid("session batch_seq out of sequence", SUBCODE_SESSION)
        current.last_seq = seq
        current.closed = last
        return session_id, current


def _parse_payload(params: dict[str, list[str]]) -> tuple[list[str], list[list[str]]]:
    try:
        payload = json.loads(params["payload"][0])
        schema = payload["schema"]
        data = payload["data"]
    except (KeyError, IndexError, TypeError, ValueError):
        raise _invalid("payload needs schema and data", SUBCODE_BAD_PAYLOAD) from None
    if isinstance(schema, str):
        if schema not in _SINGLE_KEY_SCHEMAS or not isinstance(data, list):
            raise _invalid("unsupported schema", SUBCODE_BAD_PAYLOAD)
        schema = [_SINGLE_KEY_SCHEMAS[schema]]
        data = [[value] for value in data]
    if (
        not isinstance(schema, list)
        or not schema
        or len(set(schema)) != len(schema)
        or not all(key in _AUDIENCE_KEYS for key in schema)
    ):
        raise _invalid("schema must list supported keys once each", SUBCODE_BAD_PAYLOAD)
    if not isinstance(data, list) or not data:
        raise _invalid("data must be a non-empty list", SUBCODE_BAD_PAYLOAD)
    if len(data) > MAX_AUDIENCE_ROWS:
        raise _invalid("at most 10000 rows per request", SUBCODE_TOO_MANY)
    return schema, data


def _valid_row(schema: list[str], row: Any) -> bool:
    if not isinstance(row, list) or len(row) != len(schema):
        return False
    filled = 0
    for key, value in zip(schema, row, strict=True):
        if not isinstance(value, str):
            return False
        if value:
            if key not in _UNHASHED_AUDIENCE_KEYS and not _HEX64.match(value):
                return False
            filled += 1
    return filled > 0


def _unknown_object(method: str, object_id: str) -> _GraphError:
    return _GraphError(
        400,
        100,
        f"Unsupported {method.lower()} request. Object with ID '{object_id}' does not exist, "
        "cannot be loaded due to missing permissions, or does not support this operation.",
        SUBCODE_UNKNOWN_OBJECT,
        error_type="GraphMethodException",
    )


def _first(params: dict[str, list[str]], key: str) -> str | None:
    values = params.get(key)
    return values[0] if values else None


def _redact(params: dict[str, list[str]]) -> dict[str, list[str]]:
    return {k: (["<redacted>"] if k == "access_token" else list(v)) for k, v in params.items()}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "MetaSandbox/1"

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        ctype = self.headers.get("Content-Type", "")
        form: dict[str, list[str]] = {}
        if raw and ctype.startswith("application/x-www-form-urlencoded"):
            form = parse_qs(raw.decode("utf-8"), keep_blank_values=True)
        headers = {k.lower(): v for k, v in self.headers.items()}
        sandbox: MetaSandbox = self.server.sandbox  # type: ignore[attr-defined]
        status, body, extra = sandbox.handle(method, self.path, headers, form)
        if isinstance(body, str):
            payload, content_type = body.encode("utf-8"), "text/html"
        else:
            payload, content_type = json.dumps(body).encode("utf-8"), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        # the default writes the request line (with its query string) to stderr
        return
