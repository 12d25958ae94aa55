"""Sandbox Google: one in-process gRPC server over TLS speaking both Google upload APIs.

Contract: issue #3 (item 5) and ``docs/google.md`` ("The sandbox"). It serves, with the
libraries' own message types, the Google Ads API v26 methods the adapters use
(``ConversionUploadService.UploadClickConversions``; ``OfflineUserDataJobService`` Create / Add /
Run; ``GoogleAdsService.Search`` for job status) and the Data Manager ``IngestionService``
(``IngestEvents``, ``IngestAudienceMembers``, ``RemoveAudienceMembers``,
``RemoveAllAudienceMembers``, ``RetrieveRequestStatus``), validates requests the way Google
does, and records everything. Data Manager processes a request it took later, as Google does:
its status reads PROCESSING ``status_polls`` times, then SUCCESS (or what
``fail_processing_next`` made it), and a request's records change the state only once it is
processed.

TLS: the real google-ads client only opens secure channels, so the server uses a self-signed
certificate (``etl.sandbox.tls``). gRPC reads ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH`` once per
process, at the first secure channel: ``start`` (and ``__enter__``) sets it, so start the
sandbox before creating any gRPC channel in the process. The Data Manager client reaches the
same port through a secure channel built with ``root_certificates`` (no variable needed).

Deterministic click rule (``docs/google.md``): a click id starting with ``unknown`` is
CLICK_NOT_FOUND, ``recent`` is TOO_RECENT_EVENT, ``expired`` is EXPIRED_EVENT, ``transient``
is an INTERNAL_ERROR located at its row (the Google Ads API; the row is not applied); once
``register_clicks`` has been called, any click id not registered is CLICK_NOT_FOUND too.
"""

from __future__ import annotations

import itertools
import secrets
import threading
from collections import Counter
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc

from etl.destinations.google_common import member_key
from etl.sandbox.tls import sandbox_tls

ADS_METHODS = (
    "UploadClickConversions",
    "CreateOfflineUserDataJob",
    "AddOfflineUserDataJobOperations",
    "RunOfflineUserDataJob",
    "Search",
)
DM_METHODS = (
    "IngestEvents",
    "IngestAudienceMembers",
    "RemoveAudienceMembers",
    "RemoveAllAudienceMembers",
    "RetrieveRequestStatus",
)
# the final processing statuses of a Data Manager request (RequestStatusPerDestination)
PROCESSING_STATUSES = ("SUCCESS", "FAILED", "PARTIAL_SUCCESS")
FAILURE_KINDS = (
    "transient",  # InternalError.TRANSIENT_ERROR / INTERNAL_ERROR reason
    "internal",  # InternalError.INTERNAL_ERROR
    "unavailable",  # gRPC UNAVAILABLE, no details
    "deadline",  # gRPC DEADLINE_EXCEEDED
    "rate_limit",  # per-minute limit: RESOURCE_TEMPORARILY_EXHAUSTED / RequestsPerMinute
    "daily_quota",  # QuotaError.RESOURCE_EXHAUSTED / RequestsPerDay
    "concurrent",  # DatabaseError.CONCURRENT_MODIFICATION (gRPC ABORTED)
    "unauthorized",  # UNAUTHORIZED_CUSTOMER / PERMISSION_DENIED
    "terms",  # customer data / Customer Match terms not accepted
    "no_action",  # NO_CONVERSION_ACTION_FOUND / INVALID_CONVERSION_ACTION_ID
    "permission_denied",  # gRPC PERMISSION_DENIED
    "unauthenticated",  # gRPC UNAUTHENTICATED
    "too_recent_action",  # TOO_RECENT_CONVERSION_ACTION / CONVERSION_ACTION_TOO_RECENTLY_CREATED
    "account_refused",  # the request as a whole: HeaderError.INVALID_LOGIN_CUSTOMER_ID /
    #                     DESTINATION_ACCOUNT_TYPE_MISMATCH (INVALID_ARGUMENT)
    "malformed",  # gRPC INVALID_ARGUMENT with no Google reason
)


@dataclass
class SandboxJob:
    """An ``OfflineUserDataJob`` as the sandbox holds it."""

    resource_name: str
    user_list: str
    consent_granted: bool
    direction: str | None = None  # "create" | "remove", fixed by the first such operation
    remove_all: bool = False
    operations: list[tuple[str, str]] = field(default_factory=list)  # (direction, member key)
    status: str = "PENDING"
    polls_left: int = 0


@dataclass
class SandboxRequest:
    """A Data Manager ingest request the sandbox took: processed after ``polls_left`` status
    reads answered PROCESSING, to ``status`` (one reason for every record it failed)."""

    destinations: list[Any]
    kind: str  # "events" | "add" | "remove" | "remove_all"
    records: list[int]  # per destination
    failed: list[int]  # records processing failed, per destination
    status: str = "SUCCESS"
    reason: str | None = None  # a ProcessingErrorReason name, for FAILED and PARTIAL_SUCCESS
    polls_left: int = 0


class GoogleSandbox:
    """A local stand-in for Google's upload endpoints; a context manager.

    Args:
        job_polls: status polls a run Customer Match job answers RUNNING before SUCCESS.
        status_polls: RetrieveRequestStatus calls a Data Manager request answers PROCESSING
            before its final status.
    """

    def __init__(self, *, job_polls: int = 1, status_polls: int = 0) -> None:
        self.received: list[tuple[str, Any]] = []
        self.job_polls = job_polls
        self._job_polls = job_polls  # what reset() restores
        self.status_polls = status_polls
        self._status_polls = status_polls
        self.dm_requests: dict[str, SandboxRequest] = {}  # request id -> what processing made of it
        self._processing: dict[str, list[tuple[str, str]]] = {}  # method -> (status, reason) queue
        self.lock = threading.RLock()
        self.jobs: dict[str, SandboxJob] = {}
        self.members: dict[str, set[str]] = {}
        self.used_orders: set[tuple[str, str]] = set()  # (conversion action, order id)
        self.click_conversions: set[tuple[str, str, str]] = set()  # (click, time, action)
        self.accepted: Counter[str] = Counter()
        self._failures: dict[str, list[str]] = {}
        self._clicks: dict[str, bool] = {}  # click id -> recent
        self._recent_actions: set[str] = set()
        self.leads_enabled = True  # enhanced conversions for leads turned on in the account
        self.unlocated_errors = 0  # partial failures to answer with an error that names no row
        self._ids = itertools.count(1)
        self._run = secrets.token_hex(4)
        self._server: grpc.Server | None = None
        self._port = 0
        self._cert = b""

    # lifecycle

    def start(self) -> GoogleSandbox:
        """Start serving on 127.0.0.1 (a free port); sets the gRPC roots variable first."""
        from etl.sandbox.google_ads_api import upload_handlers
        from etl.sandbox.google_ads_jobs import job_handlers
        from etl.sandbox.google_datamanager_api import datamanager_handlers

        if self._server is not None:
            return self
        tls = sandbox_tls()
        self._cert = tls.cert_pem
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="gsandbox"),
            # Google takes requests far above gRPC's 4 MB default (100,000 identifiers ~ 7 MB)
            options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
        )
        server.add_generic_rpc_handlers(
            (*upload_handlers(self), *job_handlers(self), *datamanager_handlers(self))
        )
        credentials = grpc.ssl_server_credentials([(tls.key_pem, tls.cert_pem)])
        self._port = server.add_secure_port("127.0.0.1:0", credentials)
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None)
            self._server = None

    def __enter__(self) -> GoogleSandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("GoogleSandbox is not started")
        return f"127.0.0.1:{self._port}"

    @property
    def root_certificates(self) -> bytes:
        """PEM of the sandbox certificate, for a Data Manager secure channel."""
        return self._cert

    # knobs

    def fail_next(self, method: str, kind: str, times: int = 1) -> None:
        """Make the next ``times`` calls of ``method`` fail with ``kind`` (see FAILURE_KINDS)."""
        if method not in ADS_METHODS + DM_METHODS:
            raise ValueError(f"unknown method {method!r}; one of {ADS_METHODS + DM_METHODS}")
        if kind not in FAILURE_KINDS:
            raise ValueError(f"unknown failure kind {kind!r}; one of {FAILURE_KINDS}")
        with self.lock:
            self._failures.setdefault(method, []).extend([kind] * times)

    def fail_processing_next(
        self,
        method: str,
        reason: str = "PROCESSING_ERROR_REASON_INTERNAL_ERROR",
        *,
        partial: bool = False,
        times: int = 1,
    ) -> None:
        """The next ``times`` accepted Data Manager ``method`` requests end FAILED (nothing
        applied) or, with ``partial``, PARTIAL_SUCCESS (every record but the last applied),
        with ``reason`` in the status's error counts; the call itself still succeeds."""
        if method not in DM_METHODS[:-1]:
            raise ValueError(f"unknown ingest method {method!r}; one of {DM_METHODS[:-1]}")
        with self.lock:
            status = "PARTIAL_SUCCESS" if partial else "FAILED"
            self._processing.setdefault(method, []).extend([(status, reason)] * times)

    def take_processing(self, method: str) -> tuple[str, str | None]:
        with self.lock:
            queue = self._processing.get(method)
            return queue.pop(0) if queue else ("SUCCESS", None)

    def unlocated_error_next(self, times: int = 1) -> None:
        """The next ``times`` UploadClickConversions / AddOfflineUserDataJobOperations apply
        their rows as usual but also report, in ``partial_failure_error``, an INTERNAL_ERROR
        whose location names no row: which rows it concerns cannot be told."""
        with self.lock:
            self.unlocated_errors += times

    def take_unlocated_error(self) -> bool:
        with self.lock:
            if self.unlocated_errors <= 0:
                return False
            self.unlocated_errors -= 1
            return True

    def register_clicks(self, click_ids: list[str], *, recent: bool = False) -> None:
        """Known click ids; from the first call on, unregistered click ids are not found.

        ``recent=True`` registers clicks younger than 6 hours (TOO_RECENT_EVENT).
        """
        with self.lock:
            for click in click_ids:
                self._clicks[click] = recent

    def mark_conversion_action_recent(self, action: str) -> None:
        """Treat a conversion action (resource name or id) as created less than 6 hours ago."""
        with self.lock:
            self._recent_actions.add(action.rsplit("/", 1)[-1])

    def disable_enhanced_conversions_for_leads(self) -> None:
        """Answer a conversion without a click ID CUSTOMER_NOT_ENABLED_ENHANCED_CONVERSIONS_FOR_LEADS."""
        with self.lock:
            self.leads_enabled = False

    # record

    def requests(self, method: str) -> list[Any]:
        """Every request received for ``method``, in order (failed ones included)."""
        with self.lock:
            return [request for name, request in self.received if name == method]

    def accepted_order_ids(self) -> Counter[str]:
        """How many times each order id / transaction id was accepted (not validate_only)."""
        with self.lock:
            return Counter(self.accepted)

    def list_members(self, user_list: str) -> set[str]:
        """``member_key``s currently in a Customer Match list (``customers/C/userLists/L``)."""
        with self.lock:
            return set(self.members.get(user_list, set()))

    def reset(self) -> None:
        """Forget everything received and held (knobs included); keep serving."""
        with self.lock:
            self.received.clear()
            self.jobs.clear()
            self.members.clear()
            self.used_orders.clear()
            self.click_conversions.clear()
            self.accepted.clear()
            self._failures.clear()
            self._processing.clear()
            self.dm_requests.clear()
            self._clicks.clear()
            self._recent_actions.clear()
            self.leads_enabled = True
            self.unlocated_errors = 0
            self.job_polls = self._job_polls  # a test that made jobs run for ever must not slow the next
            self.status_polls = self._status_polls

    # used by the service modules

    def record(self, method: str, request: Any) -> str:
        """Keep the request; return a fresh request id."""
        with self.lock:
            self.received.append((method, request))
            # unique across sandboxes too (the CLI starts one per run), as Google's request ids are
            return f"sandbox-{method}-{self._run}-{next(self._ids)}"

    def next_id(self) -> int:
        return next(self._ids)

    def take_failure(self, method: str) -> str | None:
        with self.lock:
            queue = self._failures.get(method)
            return queue.pop(0) if queue else None

    def click_problem(self, click: str) -> str | None:
        """The Google Ads error for a click id under the documented rule, or None."""
        with self.lock:
            if click.startswith("unknown"):
                return "CLICK_NOT_FOUND"
            if self._clicks and click not in self._clicks:
                return "CLICK_NOT_FOUND"
            if click.startswith("recent") or self._clicks.get(click):
                return "TOO_RECENT_EVENT"
            if click.startswith("expired"):
                return "EXPIRED_EVENT"
            if click.startswith("transient"):
                return "INTERNAL_ERROR"
        return None

    def action_is_recent(self, action_id: str) -> bool:
        with self.lock:
            return action_id in self._recent_actions

    def apply_members(self, user_list: str, changes: list[tuple[str, str]], *, clear: bool) -> None:
        with self.lock:
            current = self.members.setdefault(user_list, set())
            if clear:
                current.clear()
            for direction, key in changes:
                if direction == "create":
                    current.add(key)
                else:
                    current.discard(key)


def identifiers_key(identifiers: list[dict[str, Any]]) -> str:
    """``member_key`` of an identifier list already turned back into outbox-row form."""
    return member_key({"user_identifiers": identifiers})
