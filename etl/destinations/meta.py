"""Meta adapters: Conversions API events (and the shared Graph client) through facebook-business.

Why: SPEC section 5 sends ``meta_events.jsonl`` rows to Meta with the official SDK and records
one outcome per row; issue #4 and ``shared/reference/ad-platforms.md`` section B fix the
contract (batches of at most 1,000, one bad event rejects the whole request, error codes and
throttling), ``docs/architecture.md`` ("Destinations") the interface, and ``docs/meta.md`` the
decisions taken here. ``MetaAudience`` lives in ``etl.destinations.meta_audience``.

Rows arrive already normalized, hashed and through the PHI gate, so the SDK only ever sees
64-hex hashes (which it passes through unhashed), opaque ids and click ids. Still, nothing here
logs a URL, a body or ``str(FacebookRequestError)`` (which embeds the request parameters), and
every exception we raise is built from code, subcode, object id and ``fbtrace_id`` only. The
access token travels in an ``Authorization`` header rather than the SDK's default query string,
so it is not in any URL that urllib3 logs at DEBUG or a proxy writes to its access log.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import requests
from facebook_business.adobjects.serverside.action_source import ActionSource
from facebook_business.adobjects.serverside.custom_data import CustomData
from facebook_business.adobjects.serverside.event import Event
from facebook_business.adobjects.serverside.event_request import EventRequest
from facebook_business.adobjects.serverside.user_data import UserData
from facebook_business.api import FacebookAdsApi, FacebookResponse
from facebook_business.exceptions import FacebookRequestError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from etl.config import ClinicConfig
from etl.destinations.base import (
    AudienceDestination,
    ConversionDestination,
    Outcome,
    RowResult,
)
from etl.errors import ConfigError, DestinationConfigError, QuotaExhausted

if TYPE_CHECKING:
    from etl.sandbox.meta import MetaSandbox

log = logging.getLogger(__name__)

ACCESS_TOKEN_ENV = "META_ACCESS_TOKEN"
APP_SECRET_ENV = "META_APP_SECRET"
APP_ID_ENV = "META_APP_ID"
SANDBOX_URL_ENV = "META_SANDBOX_URL"
SANDBOX_TOKEN_ENV = "META_SANDBOX_TOKEN"

THROTTLE_CODES = frozenset({4, 17, 32, 613, 80003, 80004})
TRANSIENT_CODES = frozenset({1, 2, 341})
AUTH_CODES = frozenset({102, 104, 190})
PERMISSION_CODES = frozenset({10, 200})
HALT_CODES = frozenset({368, 2635})
SUBCODE_UNKNOWN_OBJECT = 33
SUBCODE_AUDIENCE_BLOCKED = 1713230
HEALTH_FLAG_MESSAGE = (
    "Meta flagged {target} as suggesting a health condition (operation_status 471 / "
    "error 100/1713230 'Audience Upload Blocked'): a flagged audience cannot be edited or used "
    "in campaigns. Resolve it in Ads Manager (see docs/meta.md, 'Health-flagged audiences') or "
    "set meta.suppression_enabled: false for this clinic."
)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_FBC = re.compile(r"^fb\.\d\.\d{10,13}\.\S+$")
_FBP = re.compile(r"^fb\.\d\.\d{10,13}\.\d+$")
_CURRENCY = re.compile(r"^[A-Za-z]{3}$")
_EVENT_KEYS = frozenset(
    {
        "event_name",
        "event_time",
        "event_id",
        "action_source",
        "user_data",
        "custom_data",
        "data_processing_options",
        "data_processing_options_country",
        "data_processing_options_state",
    }
)
_HASHED_KEYS = ("em", "ph", "fn", "ln", "ct", "st", "zp", "country", "external_id")
_FUTURE_LEEWAY_SECONDS = 60


def member_key(data_row: Sequence[str]) -> str:
    """The stable identity of one audience member row (its hashes in schema order).

    ``sha256(json.dumps(data_row, separators=(",", ":")))`` as lowercase hex; the sandbox keys
    membership the same way, so tests and the pipeline's sync state can compare members.
    """
    from etl.payloads import meta_member_key

    return meta_member_key(list(data_row))


@dataclass(frozen=True)
class GraphFailure:
    """What we keep of a failed Graph call: codes and the trace id, never the request."""

    code: int | None
    subcode: int | None = None
    fbtrace_id: str | None = None
    http_status: int | None = None
    regain_minutes: float | None = None

    @property
    def label(self) -> str:
        if self.code is None:
            return "network" if self.http_status is None else f"http_{self.http_status}"
        return f"{self.code}/{self.subcode}" if self.subcode is not None else str(self.code)

    @property
    def throttled(self) -> bool:
        return self.code in THROTTLE_CODES

    @property
    def transient(self) -> bool:
        return self.code is None or self.code in TRANSIENT_CODES

    @property
    def health_flag(self) -> bool:
        return self.code == 100 and self.subcode == SUBCODE_AUDIENCE_BLOCKED

    @property
    def stops_run(self) -> bool:
        """Account or request-level problems: retrying or bisecting cannot help."""
        if self.code is None:
            return False
        if self.code in AUTH_CODES | PERMISSION_CODES | HALT_CODES or 200 <= self.code < 300:
            return True
        return self.code == 100 and self.subcode in (
            None,
            SUBCODE_UNKNOWN_OBJECT,
            SUBCODE_AUDIENCE_BLOCKED,
        )


class GraphCallError(Exception):
    """A Graph call failed after retries; carries only a ``GraphFailure`` (no URL, no body)."""

    def __init__(self, failure: GraphFailure) -> None:
        super().__init__(failure.label)
        self.failure = failure


class MetaDestinationConfigError(DestinationConfigError):
    """Meta refused the account or object mid-batch; ``partial_results`` holds what was decided."""

    def __init__(self, message: str, partial_results: list[RowResult] | None = None) -> None:
        super().__init__(message)
        self.partial_results = list(partial_results or [])


class MetaUnavailable(QuotaExhausted):
    """Meta stayed throttled or failing after our retries; what is unsent stays for the next run."""


def describe_failure(failure: GraphFailure, target: str) -> str:
    """One clear, secret-free sentence for an error that stops the run."""
    trace = f" (fbtrace_id {failure.fbtrace_id})" if failure.fbtrace_id else ""
    code = failure.code
    if failure.health_flag:
        return HEALTH_FLAG_MESSAGE.format(target=target) + trace
    if code in AUTH_CODES:
        return (
            f"Meta rejected the access token (code {failure.label}) for {target}{trace}: set a "
            f"valid system-user token in {ACCESS_TOKEN_ENV}; with {APP_SECRET_ENV} set, it must "
            "belong to that app."
        )
    if code is not None and (code in PERMISSION_CODES or 200 <= code < 300):
        return (
            f"Meta refused permission (code {failure.label}) for {target}{trace}: the system user "
            "needs ads_management on the ad account and access to the dataset / audience."
        )
    if code == 100 and failure.subcode == SUBCODE_UNKNOWN_OBJECT:
        return (
            f"Meta says {target} does not exist or this token cannot reach it (code 100/33)"
            f"{trace}: check the id in the clinic's meta section."
        )
    if code == 100:
        return (
            f"Meta rejected the request to {target} as a whole (code 100 without a subcode, e.g. "
            f"a bad appsecret_proof){trace}: check {APP_SECRET_ENV} and the meta config."
        )
    return f"Meta refused the request to {target} (code {failure.label}){trace}."


class MetaGraphClient:
    """Our own ``FacebookAdsApi`` instance plus retries, throttling back-off and error mapping.

    Args:
        access_token: the system-user token; it goes into an ``Authorization: Bearer`` header.
        app_secret: when given, the SDK adds ``appsecret_proof`` to every request.
        graph_url: base URL override (the sandbox); None means ``https://graph.facebook.com``.
        retry_wait: base seconds of the jittered exponential back-off for transient codes.
        max_attempts: attempts per call for transient codes and network errors.
        throttle_unit: seconds per minute of ``estimated_time_to_regain_access`` (60 in
            production; tests shrink it).
        max_throttle_wait: cap on one throttling wait, in seconds.
        max_throttle_retries: throttled answers tolerated per call before giving up.
        sleep: the waiting function (tests may pass a recorder).
    """

    def __init__(
        self,
        *,
        access_token: str,
        app_secret: str | None = None,
        app_id: str | None = None,
        graph_url: str | None = None,
        retry_wait: float = 1.0,
        max_attempts: int = 4,
        throttle_unit: float = 60.0,
        max_throttle_wait: float = 900.0,
        max_throttle_retries: int = 3,
        timeout: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.api = FacebookAdsApi.init(
            app_id=app_id,
            app_secret=app_secret,
            access_token=access_token,
            timeout=timeout,
            crash_log=False,
        )
        session = self.api._session
        if graph_url:
            session.GRAPH = graph_url.rstrip("/")
        session.requests.params.pop("access_token", None)
        session.requests.headers["Authorization"] = f"Bearer {access_token}"
        self.retry_wait = retry_wait
        self.max_attempts = max_attempts
        self.throttle_unit = throttle_unit
        self.max_throttle_wait = max_throttle_wait
        self.max_throttle_retries = max_throttle_retries
        self.requests_sent = 0
        self.waits: list[tuple[str, float]] = []
        self.sandbox: MetaSandbox | None = None
        self._sleep = sleep

    def request(
        self,
        method: str,
        path: tuple[str, ...],
        params: Mapping[str, Any],
        *,
        params_in_body: bool = False,
    ) -> tuple[dict[str, Any], str | None]:
        """One Graph call: transient retries inside, throttling back-off around them.

        Args:
            params_in_body: send the parameters as a form body even for DELETE (the SDK puts
                DELETE parameters in the query string).

        Returns:
            The JSON body and the ``fbtrace_id`` (body, else the ``x-fb-trace-id`` header).

        Raises:
            GraphCallError: anything Meta or the network refused after retries and back-off.
        """
        throttled = 0
        while True:
            try:
                return self._with_retries(method, path, params, params_in_body)
            except GraphCallError as exc:
                failure = exc.failure
                if not failure.throttled or throttled >= self.max_throttle_retries:
                    raise
                throttled += 1
                wait = self._throttle_wait(failure)
                log.warning(
                    "meta: throttled (code %s, fbtrace_id %s); waiting %.1f s (estimated regain "
                    "%s min), retry %d of %d",
                    failure.label,
                    failure.fbtrace_id,
                    wait,
                    failure.regain_minutes,
                    throttled,
                    self.max_throttle_retries,
                )
                self.waits.append(("throttle", wait))
                self._sleep(wait)

    def _with_retries(
        self, method: str, path: tuple[str, ...], params: Mapping[str, Any], in_body: bool
    ) -> tuple[dict[str, Any], str | None]:
        retrying = Retrying(
            retry=retry_if_exception(lambda e: isinstance(e, GraphCallError) and e.failure.transient),
            stop=stop_after_attempt(self.max_attempts),
            wait=wait_random_exponential(multiplier=self.retry_wait, max=self.retry_wait * 30),
            sleep=self._transient_sleep,
            before_sleep=_log_retry,
            reraise=True,
        )
        return retrying(self._call_once, method, path, params, in_body)

    def _transient_sleep(self, seconds: float) -> None:
        self.waits.append(("transient", seconds))
        self._sleep(seconds)

    def _call_once(
        self, method: str, path: tuple[str, ...], params: Mapping[str, Any], in_body: bool
    ) -> tuple[dict[str, Any], str | None]:
        self.requests_sent += 1
        try:
            if in_body:
                response = self._call_with_body(method, path, params)
            else:
                response = self.api.call(method, path, params=dict(params))
        except FacebookRequestError as exc:
            raise GraphCallError(_failure_from(exc)) from None
        except requests.RequestException:
            raise GraphCallError(GraphFailure(code=None)) from None
        body = response.json()
        headers = response.headers() or {}
        trace = headers.get("x-fb-trace-id")
        status = response.status()
        if not isinstance(body, dict) or (status is not None and status >= 500):
            raise GraphCallError(GraphFailure(code=None, fbtrace_id=trace, http_status=status))
        return body, str(body.get("fbtrace_id") or trace or "") or None

    def _call_with_body(
        self, method: str, path: tuple[str, ...], params: Mapping[str, Any]
    ) -> FacebookResponse:
        session = self.api._session
        url = "/".join((session.GRAPH, self.api._api_version, *path))
        form = {
            key: value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
            for key, value in params.items()
        }
        raw = session.requests.request(
            method,
            url,
            data=form,
            headers=dict(FacebookAdsApi.HTTP_DEFAULT_HEADERS),
            timeout=session.timeout,
        )
        # the call context is what FacebookRequestError prints: keep parameters out of it
        response = FacebookResponse(
            body=raw.text,
            http_status=raw.status_code,
            headers=raw.headers,
            call={"method": method, "path": "/".join(path), "params": {}},
        )
        if response.is_failure():
            raise response.error()
        return response

    def _throttle_wait(self, failure: GraphFailure) -> float:
        minutes = failure.regain_minutes if failure.regain_minutes else 1.0
        return min(minutes * self.throttle_unit, self.max_throttle_wait)


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    label = exc.failure.label if isinstance(exc, GraphCallError) else type(exc).__name__
    log.warning("meta: transient failure (%s), attempt %d; retrying", label, state.attempt_number)


def _failure_from(exc: FacebookRequestError) -> GraphFailure:
    headers = exc.http_headers() or {}
    body = exc.body()
    error = body.get("error") if isinstance(body, dict) else None
    trace = error.get("fbtrace_id") if isinstance(error, dict) else None
    return GraphFailure(
        code=_as_int(exc.api_error_code()),
        subcode=_as_int(exc.api_error_subcode()),
        fbtrace_id=str(trace or headers.get("x-fb-trace-id") or "") or None,
        http_status=_as_int(exc.http_status()),
        regain_minutes=_regain_minutes(headers.get("x-business-use-case-usage")),
    )


def _regain_minutes(header: str | None) -> float | None:
    """Largest ``estimated_time_to_regain_access`` (minutes) in an ``X-Business-Use-Case-Usage``."""
    if not header:
        return None
    try:
        usage = json.loads(header)
        minutes = [
            float(entry.get("estimated_time_to_regain_access") or 0)
            for entries in usage.values()
            for entry in entries
        ]
    except (ValueError, TypeError, AttributeError):
        return None
    return max(minutes, default=None)


def _as_int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


class MetaEvents:
    """``ConversionDestination`` for the Conversions API: ``POST /{pixel_id}/events``.

    Every row is checked (age against ``now`` and ``meta.event_age_limit_days``, format) before
    batching, because one bad event makes Meta reject the whole request; a request Meta still
    rejects with code 100 is bisected until the bad events are isolated.

    Args:
        now: the run's end (tz-aware); event age is judged against it, never the clock.
        test_event_code: routes events to Events Manager's Test Events (still sent to Meta).
        bisect_budget: most requests one ``send`` may spend; rows left undecided are deferred.
    """

    name = "meta_events"
    max_batch = 1000

    def __init__(
        self,
        config: ClinicConfig,
        client: MetaGraphClient,
        *,
        now: datetime,
        test_event_code: str | None = None,
        bisect_budget: int = 200,
    ) -> None:
        if config.meta is None:
            raise ConfigError(f"{config.clinic_id}: the clinic config has no 'meta' section")
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware (the run's end)")
        meta = config.meta
        self._client = client
        self._pixel_id = meta.pixel_id
        self._target = f"pixel {meta.pixel_id}"
        self._names = {meta.event_names.consultation, meta.event_names.purchase}
        self._action_source = meta.action_source
        self._max_age = meta.event_age_limit_days * 86_400
        self._now = now.timestamp()
        self._test_event_code = test_event_code
        self._bisect_budget = bisect_budget
        self._ldu: tuple[int, int] | None = None
        if meta.limited_data_use:
            self._ldu = (
                int(getattr(meta, "ldu_country", 1)),
                int(getattr(meta, "ldu_state", 1000)),
            )
        self._paused: GraphFailure | None = None

    @property
    def client(self) -> MetaGraphClient:
        """The Graph client (``requests_sent``, ``waits``, ``sandbox``) for reports and tests."""
        return self._client

    def send(self, rows: Sequence[dict[str, Any]], *, validate_only: bool = False) -> list[RowResult]:
        """Send events (chunks of ``max_batch``); one result per row.

        ``validate_only`` runs the local checks only (Meta has no validate-only mode for CAPI;
        use ``test_event_code`` for a real dry send): passing rows come back DEFERRED with code
        ``validate_only``.

        Raises:
            MetaDestinationConfigError: token, permission, unknown pixel or a request-level 100;
                ``partial_results`` carries the rows already decided in this call.
        """
        results: list[RowResult] = []
        ready: list[tuple[str, Event]] = []
        seen: set[str] = set()
        for row in rows:
            key = str(row.get("event_id", "")) if isinstance(row, Mapping) else ""
            problem = self._precheck(row)
            event = None if problem else self._build_event(row)
            if event is None:
                results.append(RowResult(key, Outcome.REJECTED, problem or "invalid_format"))
            elif key in seen:
                results.append(RowResult(key, Outcome.REJECTED, "duplicate_event_id"))
            else:
                seen.add(key)
                ready.append((key, event))
        prechecked = len(results)
        if validate_only:
            results += [RowResult(key, Outcome.DEFERRED, "validate_only") for key, _ in ready]
            return results
        budget = [self._bisect_budget]
        for start in range(0, len(ready), self.max_batch):
            self._deliver(ready[start : start + self.max_batch], results, budget)
        counts = {o.value: sum(1 for r in results if r.outcome == o) for o in Outcome}
        log.info(
            "meta_events: %d rows for %s: %d failed local checks; outcomes %s",
            len(rows),
            self._target,
            prechecked,
            counts,
        )
        return results

    def _deliver(self, batch: list[tuple[str, Event]], out: list[RowResult], budget: list[int]) -> None:
        if self._paused is not None:
            out += _all(batch, Outcome.DEFERRED, f"throttled/{self._paused.label}")
            return
        if budget[0] <= 0:
            out += _all(batch, Outcome.DEFERRED, "bisect_budget")
            return
        budget[0] -= 1
        request = EventRequest(
            pixel_id=self._pixel_id,
            events=[event for _, event in batch],
            test_event_code=self._test_event_code,
        )
        failure: GraphFailure | None = None
        try:
            body, trace = self._client.request("POST", (self._pixel_id, "events"), request.get_params())
        except GraphCallError as exc:
            failure = exc.failure
        if failure is not None:
            # outside the except block, so nothing we raise carries the SDK error as context
            self._handle_failure(failure, batch, out, budget)
            return
        received = body.get("events_received")
        if received != len(batch):
            log.warning(
                "meta_events: %s reported %s events received for %d sent (fbtrace_id %s)",
                self._target,
                received,
                len(batch),
                trace,
            )
        out += _all(batch, Outcome.ACCEPTED, None, trace)

    def _handle_failure(
        self,
        failure: GraphFailure,
        batch: list[tuple[str, Event]],
        out: list[RowResult],
        budget: list[int],
    ) -> None:
        if failure.stops_run:
            raise MetaDestinationConfigError(describe_failure(failure, self._target), out)
        if failure.throttled:
            self._paused = failure
            log.warning(
                "meta_events: still throttled after back-off (code %s); deferring the rest of "
                "this run's events",
                failure.label,
            )
            out += _all(batch, Outcome.DEFERRED, f"throttled/{failure.label}", failure.fbtrace_id)
        elif failure.transient:
            out += _all(batch, Outcome.DEFERRED, f"transient/{failure.label}", failure.fbtrace_id)
        elif failure.code == 100 and len(batch) == 1:
            out += _all(batch, Outcome.REJECTED, failure.label, failure.fbtrace_id)
        elif failure.code == 100:
            log.info(
                "meta_events: %s rejected a request of %d events (code %s, fbtrace_id %s); bisecting",
                self._target,
                len(batch),
                failure.label,
                failure.fbtrace_id,
            )
            middle = len(batch) // 2
            self._deliver(batch[:middle], out, budget)
            self._deliver(batch[middle:], out, budget)
        else:
            # not known to be event-specific, so bisecting could cost 2n requests for nothing
            log.warning("meta_events: unexpected Meta error %s; deferring", failure.label)
            out += _all(batch, Outcome.DEFERRED, failure.label, failure.fbtrace_id)

    def _precheck(self, row: Any) -> str | None:
        """``"stale_event"``, ``"invalid_format"`` or None; values never leave this function."""
        if not isinstance(row, Mapping) or not set(row) <= _EVENT_KEYS:
            return "invalid_format"
        event_time = row.get("event_time")
        if (
            not isinstance(row.get("event_id"), str)
            or not _HEX64.match(row["event_id"])
            or not isinstance(row.get("event_name"), str)
            or row["event_name"] not in self._names
            or row.get("action_source") != self._action_source
            or not isinstance(event_time, int)
            or isinstance(event_time, bool)
            or event_time > self._now + _FUTURE_LEEWAY_SECONDS
            or not _valid_user_data(row.get("user_data"))
            or not _valid_custom_data(row.get("custom_data"), row.get("event_name") == "Purchase")
            or not _valid_ldu(row)
        ):
            return "invalid_format"
        if self._now - event_time > self._max_age:
            return "stale_event"
        return None

    def _build_event(self, row: Mapping[str, Any]) -> Event | None:
        user = row["user_data"]
        custom = row.get("custom_data")
        options = row.get("data_processing_options")
        country = row.get("data_processing_options_country")
        state = row.get("data_processing_options_state")
        if options is None and self._ldu is not None:
            options, (country, state) = ["LDU"], self._ldu
        event = Event(
            event_name=row["event_name"],
            event_time=row["event_time"],
            event_id=row["event_id"],
            action_source=ActionSource(row["action_source"]),
            user_data=UserData(
                emails=user.get("em"),
                phones=user.get("ph"),
                first_names=user.get("fn"),
                last_names=user.get("ln"),
                cities=user.get("ct"),
                states=user.get("st"),
                zip_codes=user.get("zp"),
                country_codes=user.get("country"),
                external_ids=user.get("external_id"),
                fbc=user.get("fbc"),
                fbp=user.get("fbp"),
            ),
            custom_data=(
                CustomData(value=float(custom["value"]), currency=custom["currency"]) if custom else None
            ),
            data_processing_options=options,
            data_processing_options_country=country,
            data_processing_options_state=state,
        )
        try:
            event.normalize()
        except (TypeError, ValueError):
            # the SDK's messages quote the value; only the fact that it failed is kept
            return None
        return event


def _all(
    batch: list[tuple[str, Event]], outcome: Outcome, code: str | None, trace: str | None = None
) -> list[RowResult]:
    return [RowResult(key, outcome, code, trace) for key, _ in batch]


def _valid_user_data(user: Any) -> bool:
    if not isinstance(user, Mapping) or not user:
        return False
    for key, value in user.items():
        if key in _HASHED_KEYS:
            if not isinstance(value, list) or not value:
                return False
            if not all(isinstance(v, str) and _HEX64.match(v) for v in value):
                return False
        elif key == "fbc":
            if not isinstance(value, str) or not _FBC.match(value):
                return False
        elif key == "fbp":
            if not isinstance(value, str) or not _FBP.match(value):
                return False
        else:
            return False
    return True


def _valid_custom_data(custom: Any, required: bool) -> bool:
    if custom is None:
        return not required
    if not isinstance(custom, Mapping) or set(custom) != {"value", "currency"}:
        return False
    value = custom["value"]
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and isinstance(custom["currency"], str)
        and bool(_CURRENCY.match(custom["currency"]))
    )


def _valid_ldu(row: Mapping[str, Any]) -> bool:
    options = row.get("data_processing_options")
    if options is None:
        return "data_processing_options_country" not in row and "data_processing_options_state" not in row
    if not isinstance(options, list) or any(o != "LDU" for o in options):
        return False
    if not options:
        return True
    return row.get("data_processing_options_country") in (0, 1) and row.get(
        "data_processing_options_state"
    ) in (0, 1000)


def doctor_meta(config: ClinicConfig, environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """Offline readiness checks for Meta: ``(check, "ok" | "missing ...")``; never a secret."""
    checks: list[tuple[str, str]] = []
    meta = config.meta
    checks.append(("meta config", "ok" if meta is not None else "missing meta section"))
    checks.append(
        (
            ACCESS_TOKEN_ENV,
            "ok" if environ.get(ACCESS_TOKEN_ENV, "").strip() else f"missing {ACCESS_TOKEN_ENV}",
        )
    )
    checks.append(
        (
            APP_SECRET_ENV,
            "ok"
            if environ.get(APP_SECRET_ENV, "").strip()
            else f"missing {APP_SECRET_ENV} (optional; without it no appsecret_proof is sent)",
        )
    )
    checks.append(
        (
            APP_ID_ENV,
            "ok" if environ.get(APP_ID_ENV, "").strip() else f"missing {APP_ID_ENV} (optional)",
        )
    )
    if meta is not None:
        checks.append(("meta.pixel_id", "ok"))
        checks.append(
            (
                "meta.event_age_limit_days",
                f"ok ({meta.event_age_limit_days} days for {meta.action_source})",
            )
        )
        if meta.suppression_enabled:
            checks.append(
                (
                    "meta.suppression_audience_id",
                    "ok"
                    if meta.suppression_audience_id
                    else "missing meta.suppression_audience_id (suppression sync is skipped)",
                )
            )
    return checks


def make_meta_destinations(
    config: ClinicConfig,
    *,
    target: Literal["live", "sandbox"],
    now: datetime,
    sandbox: MetaSandbox | None = None,
    test_event_code: str | None = None,
    retry_wait: float | None = None,
    environ: Mapping[str, str] | None = None,
    session_seed: str | None = None,
) -> tuple[ConversionDestination, AudienceDestination]:
    """Build the Meta event and audience adapters on one Graph client.

    Args:
        target: ``"live"`` reads ``META_ACCESS_TOKEN`` (required), ``META_APP_SECRET`` and
            ``META_APP_ID`` (optional) from ``environ``; ``"sandbox"`` uses ``sandbox``, else
            the sandbox at ``META_SANDBOX_URL`` (token ``META_SANDBOX_TOKEN``, default
            ``sandbox-token``), else starts one whose clock is ``now`` and which lives until
            the process exits (reachable as ``events.client.sandbox``).
        now: the run's end (tz-aware): event age limits and the audience session seed use it.
        retry_wait: scales every wait (transient back-off base in seconds; a throttling minute
            lasts ``60 * retry_wait`` seconds, capped at ``900 * retry_wait``); default 1.0.
        environ: defaults to ``os.environ``.
        session_seed: seeds audience ``session_id``s; default ``"<clinic_id>:<now>"``.

    Raises:
        ConfigError: no ``meta`` section, or ``META_ACCESS_TOKEN`` missing for a live target.
    """
    from etl.destinations.meta_audience import MetaAudience

    if config.meta is None:
        raise ConfigError(f"{config.clinic_id}: the clinic config has no 'meta' section")
    scale = 1.0 if retry_wait is None else retry_wait
    env = os.environ if environ is None else environ
    secret: str | None = None
    app_id: str | None = None
    if target == "sandbox" and sandbox is None and env.get(SANDBOX_URL_ENV):
        # a sandbox in another process (e.g. a test that kills and reruns the CLI)
        from etl.sandbox.meta import DEFAULT_ACCESS_TOKEN

        token = env.get(SANDBOX_TOKEN_ENV) or DEFAULT_ACCESS_TOKEN
        graph_url: str | None = env[SANDBOX_URL_ENV]
    elif target == "sandbox":
        if sandbox is None:
            from etl.sandbox.meta import MetaSandbox

            sandbox = MetaSandbox(now=now).start()
        token, secret, graph_url = sandbox.access_token, sandbox.app_secret, sandbox.url
    elif target == "live":
        token = env.get(ACCESS_TOKEN_ENV, "").strip()
        if not token:
            raise ConfigError(
                f"{ACCESS_TOKEN_ENV} is not set: a live Meta run needs a system-user access token"
            )
        secret = env.get(APP_SECRET_ENV, "").strip() or None
        app_id = env.get(APP_ID_ENV, "").strip() or None
        graph_url = None
    else:
        raise ValueError(f"unknown target {target!r}")
    client = MetaGraphClient(
        access_token=token,
        app_secret=secret,
        app_id=app_id,
        graph_url=graph_url,
        retry_wait=scale,
        throttle_unit=60.0 * scale,
        max_throttle_wait=900.0 * scale,
    )
    client.sandbox = sandbox
    events = MetaEvents(config, client, now=now, test_event_code=test_event_code)
    audience = MetaAudience(config, client, now=now, session_seed=session_seed)
    return events, audience
