"""The request-handling half of the Meta sandbox: HTTP, authentication, routing and state.

Why: ``etl.sandbox.meta.MetaSandbox`` answers the facebook-business SDK over a real socket
(STYLE.md item 15) the way the Graph API does for the Conversions API and Custom Audiences; the
contract is ``shared/reference/ad-platforms.md`` section B and ``shared/reference/stack.md``
section 5, the behaviour worth knowing ``docs/meta.md`` ("The sandbox"). ``GraphEndpoints`` is
the part of ``MetaSandbox`` that serves requests (a mixin holding no state of its own: the
sandbox's ``__init__`` sets every attribute declared on it); the checks of what Meta refuses are
in ``etl.sandbox.meta_checks``. It logs nothing, and the access token is redacted from what it
records.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from etl.sandbox.meta_checks import (
    MAX_EVENTS_PER_REQUEST,
    SUBCODE_AUDIENCE_BLOCKED,
    SUBCODE_BAD_PAYLOAD,
    SUBCODE_SESSION,
    SUBCODE_TOO_MANY,
    GraphError,
    check_event,
    invalid,
    parse_payload,
    unknown_object,
    valid_row,
)

_VERSION = re.compile(r"^v\d+\.\d+$")


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
    """One event the sandbox accepted, with its pixel, test code and request trace id."""

    pixel_id: str
    event: dict[str, Any]
    test_event_code: str | None
    fbtrace_id: str


@dataclass
class AudienceSession:
    """One audience upload session (``session_id``): its kind, last ``batch_seq`` and staged rows."""

    kind: str
    last_seq: int
    closed: bool
    staged: dict[str, list[str]] = field(default_factory=dict)


class GraphEndpoints:
    """The Graph API endpoints of ``MetaSandbox``, called from the server threads."""

    access_token: str
    app_secret: str | None
    now: datetime | None
    pixel_ids: set[str] | None
    audience_ids: set[str] | None
    received: list[ReceivedRequest]
    _accepted: list[AcceptedEvent]
    _members: dict[str, dict[str, list[str]]]
    _sessions: dict[tuple[str, int], AudienceSession]
    _flagged: set[str]
    _status_471: set[str]
    _denied: set[str]
    _poisoned: dict[str, int]
    _faults: list[GraphError | None]  # None: let that request through
    _lock: threading.Lock

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
                fault = self._faults.pop(0) if self._faults else None
                if fault is not None:
                    raise fault
                status, body = 200, self._route(method, split.path, query, form, fbtrace_id)
                extra: dict[str, str] = {}
            except GraphError as err:
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
            raise GraphError(400, 104, "An access token is required to request this resource.")
        if not hmac.compare_digest(token.encode(), self.access_token.encode()):
            raise GraphError(400, 190, "Invalid OAuth access token - Cannot parse access token")
        if self.app_secret is not None:
            proof = (query.get("appsecret_proof") or form.get("appsecret_proof") or [""])[0]
            expected = hmac.new(self.app_secret.encode(), token.encode(), hashlib.sha256).hexdigest()
            if not hmac.compare_digest(proof.encode(), expected.encode()):
                raise GraphError(
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
            raise unknown_object(method, "")
        object_id = parts[0]
        if object_id in self._denied:
            raise GraphError(403, 200, "(#200) Permissions error", error_type="OAuthException")
        if method == "POST" and (form.get("method") or [""])[0].lower() == "delete":
            method = "DELETE"
        edge = parts[1] if len(parts) == 2 else None
        on_audience = edge in ("users", "usersreplace") or (method == "GET" and len(parts) == 1)
        if on_audience and self.audience_ids is not None and object_id not in self.audience_ids:
            raise unknown_object(method, object_id)
        if method == "GET" and len(parts) == 1:
            return self._read_object(object_id)
        if method == "POST" and edge == "events":
            return self._events(object_id, form, fbtrace_id)
        if edge == "users" and method in ("POST", "DELETE"):
            kind = "add" if method == "POST" else "remove"
            return self._audience(object_id, kind, {**query, **form})
        if edge == "usersreplace" and method == "POST":
            return self._audience(object_id, "replace", form)
        raise unknown_object(method, object_id)

    def _read_object(self, object_id: str) -> dict[str, Any]:
        if object_id in self._status_471:
            status = {"code": 471, "description": "This audience suggests a health condition."}
        else:
            status = {"code": 200, "description": "Normal"}
        return {"id": object_id, "operation_status": status}

    # conversions API

    def _events(self, pixel_id: str, form: dict[str, list[str]], fbtrace_id: str) -> dict[str, Any]:
        if self.pixel_ids is not None and pixel_id not in self.pixel_ids:
            raise unknown_object("POST", pixel_id)
        try:
            raw = json.loads(form["data"][0])
            if not isinstance(raw, list):
                raise ValueError
            events = [json.loads(item) if isinstance(item, str) else item for item in raw]
        except (KeyError, IndexError, ValueError):
            raise invalid("data must be a JSON array of events", SUBCODE_BAD_PAYLOAD) from None
        if not events:
            raise invalid("data must not be empty", SUBCODE_BAD_PAYLOAD)
        if len(events) > MAX_EVENTS_PER_REQUEST:
            raise invalid("at most 1000 events per request", SUBCODE_TOO_MANY)
        now = (self.now or datetime.now(UTC)).timestamp()
        for event in events:
            check_event(event, now, self._poisoned)
        test_code = _first(form, "test_event_code")
        for event in events:
            self._accepted.append(AcceptedEvent(pixel_id, event, test_code, fbtrace_id))
        return {"events_received": len(events), "messages": [], "fbtrace_id": fbtrace_id}

    # custom audiences

    def _audience(self, audience_id: str, kind: str, params: dict[str, list[str]]) -> dict[str, Any]:
        if audience_id in self._flagged:
            raise GraphError(
                400,
                100,
                "Audience Upload Blocked: this audience may suggest a health condition.",
                SUBCODE_AUDIENCE_BLOCKED,
                title="Audience Upload Blocked",
            )
        schema, rows = parse_payload(params)
        session_id, session = self._session_step(audience_id, kind, params)
        invalid = 0
        accepted: dict[str, list[str]] = {}
        for row in rows:
            if valid_row(schema, row):
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
    ) -> tuple[int | None, AudienceSession | None]:
        raw = _first(params, "session")
        if raw is None:
            if kind == "replace":
                raise invalid("usersreplace requires a session", SUBCODE_SESSION)
            return None, None
        try:
            spec = json.loads(raw)
            session_id, seq = int(spec["session_id"]), int(spec["batch_seq"])
            last = bool(spec.get("last_batch_flag", False))
        except (KeyError, TypeError, ValueError):
            raise invalid("session needs session_id and batch_seq", SUBCODE_SESSION) from None
        key = (audience_id, session_id)
        current = self._sessions.get(key)
        if seq == 1:
            if current is not None:  # Meta: a session_id is unique per ad account, never reused
                raise invalid("session_id already used", SUBCODE_SESSION)
            current = AudienceSession(kind=kind, last_seq=0, closed=False)
            self._sessions[key] = current
        elif current is None or current.closed or current.kind != kind or seq != current.last_seq + 1:
            raise invalid("session batch_seq out of sequence", SUBCODE_SESSION)
        current.last_seq = seq
        current.closed = last
        return session_id, current


def _first(params: dict[str, list[str]], key: str) -> str | None:
    values = params.get(key)
    return values[0] if values else None


def _redact(params: dict[str, list[str]]) -> dict[str, list[str]]:
    return {k: (["<redacted>"] if k == "access_token" else list(v)) for k, v in params.items()}


class GraphHTTPHandler(BaseHTTPRequestHandler):
    """Reads a request off the socket, has the sandbox answer it, writes the answer back."""

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
        sandbox: GraphEndpoints = self.server.sandbox  # type: ignore[attr-defined]
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
