"""The shared Meta Graph client and its error model, used by both Meta adapters.

Why: ``MetaEvents`` (``etl.destinations.meta``) and ``MetaAudience``
(``etl.destinations.meta_audience``) talk to the Graph API through one ``FacebookAdsApi``
instance with the same retries, throttling back-off and error classification. The error codes,
throttling and limits are fixed by issue #4 and ``shared/reference/ad-platforms.md`` section B;
what each failure means for a run is in ``docs/meta.md``.

Nothing here logs a URL, a body or ``str(FacebookRequestError)`` (which embeds the request
parameters), and every exception we raise is built from code, subcode, object id and
``fbtrace_id`` only. The access token travels in an ``Authorization`` header rather than the
SDK's default query string, so it is not in any URL that urllib3 logs at DEBUG or a proxy writes
to its access log.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import requests
from facebook_business.api import FacebookAdsApi, FacebookResponse
from facebook_business.exceptions import FacebookRequestError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from etl.errors import DestinationConfigError, QuotaExhausted

if TYPE_CHECKING:
    from etl.sandbox.meta import MetaSandbox

# the client's records keep the logger name they had before it left etl.destinations.meta
log = logging.getLogger("etl.destinations.meta")

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
