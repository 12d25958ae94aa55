"""What the two Google adapters share: limits, row checks, error classes, retries, bisection.

Contract: issue #3 and ``docs/google.md``; limits and error codes from
``shared/reference/ad-platforms.md`` section A; rows are the outbox shapes of SPEC section 5.
Both adapters (``google_ads``: Google Ads API; ``google_datamanager``: Data Manager API) reduce
every platform answer to a ``CallFailure`` of one ``Kind``, so retry, stop and bisect rules live
here once. Nothing in this module ever formats a row value into a message: codes, counts,
customer ids and request ids only (SPEC section 2).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, TypeVar

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from etl.destinations.base import AudienceResult, Outcome, RowResult
from etl.errors import DestinationConfigError, QuotaExhausted

log = logging.getLogger("etl.destinations.google")

MAX_CONVERSIONS_PER_REQUEST = 2_000
MAX_DM_MEMBERS_PER_REQUEST = 10_000
ADS_IDENTIFIERS_PER_ADD_CALL = 10_000  # Google's advice; the hard cap is 100,000
MAX_ADS_IDENTIFIERS_PER_USER_DATA = 20
MAX_ADS_CONVERSION_IDENTIFIERS = 5
MAX_DM_IDENTIFIERS = 10
MAX_DM_DESTINATIONS = 10

HEX64 = re.compile(r"^[0-9a-f]{64}$")
DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}[+-]\d{2}:\d{2}$")
CONVERSION_ACTION = re.compile(r"^customers/(\d+)/conversionActions/(\d+)$")
USER_LIST = re.compile(r"^customers/(\d+)/userLists/(\d+)$")
CLICK_ID_KEYS = ("gclid", "gbraid", "wbraid")
CONVERSION_KEYS = frozenset(
    {
        "conversion_action",
        "conversion_date_time",
        "conversion_value",
        "currency_code",
        "order_id",
        "user_identifiers",
        "consent",
        *CLICK_ID_KEYS,
    }
)
ADDRESS_KEYS = frozenset({"hashed_first_name", "hashed_last_name", "country_code", "postal_code"})

# per-row outcomes (Google Ads partial failures; Data Manager request-level reasons)
DEFERRED_CODES = frozenset(
    {
        "TOO_RECENT_EVENT",
        "TOO_RECENT_CONVERSION_ACTION",
        "TOO_RECENT_CALL",
        "CONVERSION_ACTION_TOO_RECENTLY_CREATED",
    }
)
ALREADY_SENT_CODES = frozenset({"ORDER_ID_ALREADY_IN_USE", "CLICK_CONVERSION_ALREADY_EXISTS"})
TRANSIENT_CODES = frozenset(
    {
        "INTERNAL_ERROR",
        "TRANSIENT_ERROR",
        "DEADLINE_EXCEEDED",
        "RESOURCE_TEMPORARILY_EXHAUSTED",
        "CONCURRENT_MODIFICATION",
    }
)
# account set-up problems: the run stops with one message (reason -> what to fix)
CONFIG_HINTS: Mapping[str, str] = {
    "UNAUTHORIZED_CUSTOMER": "the credentials cannot upload for this customer; check "
    "google_ads.customer_id and the login customer id",
    "INVALID_CUSTOMER_FOR_CLICK": "the clicks belong to another account; upload to the "
    "account that owns the conversion action",
    "CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS": "accept the customer data terms in Google Ads",
    "CUSTOMER_NOT_ENABLED_ENHANCED_CONVERSIONS_FOR_LEADS": "turn on enhanced conversions for "
    "leads in Google Ads, or set google_ads.enhanced_conversions_for_leads: false",
    "CUSTOMER_DATA_POLICY_PROHIBITS_ENHANCED_CONVERSIONS": "Google's customer data policy "
    "forbids enhanced conversions for this account",
    "NO_CONVERSION_ACTION_FOUND": "check google_ads.conversion_actions",
    "INVALID_CONVERSION_ACTION_TYPE": "the conversion action must be of type 'Import from clicks'",
    "INVALID_CONVERSION_ACTION_ID": "check google_ads.conversion_actions",
    "INVALID_USER_LIST_ID": "check google_ads.suppression_user_list",
    "INVALID_USER_LIST_TYPE": "the suppression list must be a Customer Match (CRM) list",
    "TERMS_AND_CONDITIONS_NOT_SIGNED": "accept the Customer Match terms in Google Ads",
    "DESTINATION_ACCOUNT_NOT_ENABLED_ENHANCED_CONVERSIONS_FOR_LEADS": "turn on enhanced "
    "conversions for leads in Google Ads",
    "DESTINATION_ACCOUNT_DATA_POLICY_PROHIBITS_ENHANCED_CONVERSIONS": "Google's customer data "
    "policy forbids enhanced conversions for this account",
    "DESTINATION_ACCOUNT_ENHANCED_CONVERSIONS_TERMS_NOT_SIGNED": "accept the enhanced "
    "conversions terms in Google Ads",
    "INVALID_DESTINATION": "check google_ads.customer_id and the conversion action / list ids",
    "OPERATING_ACCOUNT_LOGIN_ACCOUNT_MISMATCH": "check the login customer id",
    "NOT_ALLOWLISTED": "the account or project is not allowlisted for this feature",
    "PERMISSION_DENIED": "the credentials lack access to this account",
    "UNAUTHENTICATED": "the credentials were refused; run `medspa-conversions doctor`",
    "OAUTH_REFRESH_FAILED": "no access token could be obtained with the configured credentials; "
    "run `medspa-conversions doctor`",
}
CONFIG_CODES = frozenset(CONFIG_HINTS)


def member_key(row: Mapping[str, Any]) -> str:
    """Opaque key of one Customer Match member row: sha256 hex of its canonical identifiers.

    The pipeline keys the suppression mirror on the same function, so a member's key never
    depends on the order of dict keys (it does depend on the order of the identifier list).
    """
    from etl.payloads import google_member_key

    return google_member_key(dict(row))


class Kind(Enum):
    RETRY = "retry"  # transient: retried here, around the network call only
    CONFIG = "config"  # account set-up: stop the run
    QUOTA = "quota"  # daily quota spent: stop, the rest stays planned
    INVALID = "invalid"  # the request was refused for its content (Data Manager: bisect)
    DEFER_ALL = "defer_all"  # every row of the request comes back next run


@dataclass(frozen=True)
class CallFailure:
    kind: Kind
    code: str
    request_id: str | None = None


class CallFailed(Exception):
    """Internal carrier of a classified failure; never shown to a user as is."""

    def __init__(self, failure: CallFailure, *, exhausted: bool = False) -> None:
        super().__init__(failure.code)
        self.failure = failure
        self.exhausted = exhausted


class _Retryable(Exception):
    def __init__(self, failure: CallFailure) -> None:
        super().__init__(failure.code)
        self.failure = failure


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded jittered exponential backoff; ``wait`` is the first delay in seconds."""

    attempts: int = 5
    wait: float = 1.0
    max_wait: float = 60.0


@dataclass
class GoogleAudienceResult(AudienceResult):
    """``AudienceResult`` plus the members Google refused, keyed by ``member_key``.

    Every member not listed here was applied (or, with ``validate_only``, would be).
    """

    rejected_members: list[RowResult] = field(default_factory=list)
    # Data Manager requests Google took, to check once processed (etl.confirm):
    # request ID -> (method, members)
    checks: dict[str, tuple[str, int]] = field(default_factory=dict)


T = TypeVar("T")
R = TypeVar("R")


def call_with_retry(
    call: Callable[[], T],
    classify: Callable[[BaseException], CallFailure | None],
    policy: RetryPolicy,
    *,
    label: str,
) -> T:
    """Run one network call, retrying only the failures ``classify`` marks ``Kind.RETRY``.

    Raises:
        CallFailed: a classified failure (``exhausted`` when retries ran out).
        Exception: anything ``classify`` does not recognise, unchanged (a bug, not the platform).
    """

    def attempt() -> T:
        try:
            return call()
        except Exception as exc:
            failure = classify(exc)
            if failure is None:
                raise
            if failure.kind is Kind.RETRY:
                log.warning("%s: transient %s, will retry", label, failure.code)
                raise _Retryable(failure) from None
            raise CallFailed(failure) from None

    retrying = Retrying(
        stop=stop_after_attempt(policy.attempts),
        wait=wait_exponential_jitter(multiplier=policy.wait, max=policy.max_wait, jitter=policy.wait),
        retry=retry_if_exception_type(_Retryable),
        reraise=True,
    )
    try:
        return retrying(attempt)
    except _Retryable as exc:
        raise CallFailed(exc.failure, exhausted=True) from None


@contextmanager
def carrying(decided: Sequence[Any]) -> Iterator[None]:
    """A stop raised inside carries ``decided`` (rows the platform already answered) with it.

    ``etl.deliver`` records a stop's ``partial_results`` before re-raising, so rows accepted
    before a quota or account stop are not sent again: the Data Manager API has no "already
    there" answer, a second send would count the conversion twice.
    """
    try:
        yield
    except (DestinationConfigError, QuotaExhausted) as stop:
        stop.partial_results = [*decided, *stop.partial_results]
        raise


def send_bisecting(
    rows: Sequence[T],
    send_once: Callable[[Sequence[T]], list[R]],
    reject: Callable[[T, CallFailure], R],
) -> list[R]:
    """Send ``rows``; when the platform refuses the whole request for its content, split it.

    The Data Manager API fails a request for one bad item, so a refused batch is halved
    recursively until each bad row stands alone and is recorded as rejected, while the good
    halves go through (about 2 * bad * log2(n) extra requests). A stop in a later half carries
    the earlier halves' results.
    """
    try:
        return send_once(rows)
    except CallFailed as exc:
        if exc.failure.kind is not Kind.INVALID:
            raise
        if len(rows) == 1:
            return [reject(rows[0], exc.failure)]
        middle = len(rows) // 2
        log.info("request refused (%s): bisecting %d rows", exc.failure.code, len(rows))
        left = send_bisecting(rows[:middle], send_once, reject)
        with carrying(left):
            return left + send_bisecting(rows[middle:], send_once, reject)


def raise_stop(failure: CallFailure, *, api: str, method: str, customer_id: str) -> None:
    """Turn a CONFIG or QUOTA failure into the domain exception that stops the run."""
    rid = f" (request id {failure.request_id})" if failure.request_id else ""
    if failure.kind is Kind.CONFIG:
        hint = CONFIG_HINTS.get(
            failure.code,
            "the request was refused as a whole; check the Google account set-up (the rows stay "
            "planned for the next run)",
        )
        raise DestinationConfigError(
            f"Google {api} refused {method} for customer {customer_id}: {failure.code}; {hint}{rid}"
        )
    if failure.kind is Kind.QUOTA:
        raise QuotaExhausted(
            f"Google {api} quota exhausted ({failure.code}) on {method} for customer "
            f"{customer_id}; unsent rows stay planned for the next run{rid}"
        ) from None


def classify_auth_error(exc: BaseException) -> CallFailure | None:
    """google-auth failures getting a token: a refused refresh stops, a network blip retries."""
    from google.auth import exceptions as auth_exceptions

    if isinstance(exc, auth_exceptions.RefreshError):
        return CallFailure(Kind.CONFIG, "OAUTH_REFRESH_FAILED")
    if isinstance(exc, auth_exceptions.TransportError):
        return CallFailure(Kind.RETRY, "TOKEN_TRANSPORT_ERROR")
    return None


def outcome_for(code: str) -> Outcome:
    """A row's outcome from the error Google gave that row (partial failure)."""
    if code in ALREADY_SENT_CODES:
        return Outcome.ALREADY_SENT
    if code in DEFERRED_CODES or code in TRANSIENT_CODES:
        # a transient fault says nothing final about the row: sent again next run, where an
        # order_id Google had applied after all is answered as already there
        return Outcome.DEFERRED
    return Outcome.REJECTED


def chunked(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _check_identifier_value(value: object, *, strict: bool) -> str | None:
    if not isinstance(value, str) or not value:
        return "INVALID_SHA256_FORMAT"
    if strict and not HEX64.match(value):
        return "INVALID_SHA256_FORMAT"
    return None


def _real_date_time(text: str) -> bool:
    """The format, and a time that exists (2026-02-30 has the format; building the request
    from it failed the whole batch instead of refusing the one row)."""
    if not DATE_TIME.match(text):
        return False
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


def check_conversion_row(row: Mapping[str, Any], *, strict: bool, max_ids: int) -> str | None:
    """Return a reason code when a conversion row cannot be sent, else None.

    ``strict`` adds the value checks the Data Manager API would fail a whole request for
    (64-hex hashes, date format, identifier count); without it only the structure is checked
    and the Google Ads API judges values per row (partial failure).
    """
    if not isinstance(row, Mapping) or not set(row) <= CONVERSION_KEYS:
        return "INVALID_EVENT"
    if not isinstance(row.get("order_id"), str) or not row["order_id"]:
        return "REQUIRED_FIELD_MISSING"
    if not isinstance(row.get("conversion_action"), str) or not CONVERSION_ACTION.match(
        row["conversion_action"]
    ):
        return "INVALID_CONVERSION_ACTION_ID"
    when = row.get("conversion_date_time")
    if not isinstance(when, str) or (strict and not _real_date_time(when)):
        return "EVENT_TIME_INVALID"
    clicks = [k for k in CLICK_ID_KEYS if row.get(k) is not None]
    if (strict and len(clicks) > 1) or any(not isinstance(row[k], str) or not row[k] for k in clicks):
        return "INVALID_EVENT"
    value = row.get("conversion_value")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        return "INVALID_NUMBER_FORMAT"
    currency = row.get("currency_code")
    if currency is not None and (not isinstance(currency, str) or not re.match(r"^[A-Z]{3}$", currency)):
        return "INVALID_CURRENCY_CODE"
    consent = row.get("consent")
    if not isinstance(consent, Mapping) or consent.get("ad_user_data") not in ("GRANTED", "DENIED"):
        return "REQUIRED_FIELD_MISSING"
    ids = row.get("user_identifiers") or []
    if not isinstance(ids, list):
        return "INVALID_EVENT"
    if strict and len(ids) > max_ids:
        return "TOO_MANY_USER_IDENTIFIERS"
    for ident in ids:
        if not isinstance(ident, Mapping) or len(ident) != 1:
            return "INVALID_EVENT"
        ((kind, val),) = ident.items()
        if kind not in ("hashed_email", "hashed_phone_number"):
            return "INVALID_EVENT"
        if problem := _check_identifier_value(val, strict=strict):
            return problem
    if not clicks and not ids:
        return "NO_IDENTIFIERS_PROVIDED"
    return None


def check_member_row(row: Mapping[str, Any], *, strict: bool, max_ids: int) -> str | None:
    """Return a reason code when a Customer Match member row cannot be sent, else None."""
    if not isinstance(row, Mapping) or set(row) != {"operation", "user_identifiers"}:
        return "INVALID_AUDIENCE_MEMBER"
    ids = row["user_identifiers"]
    if not isinstance(ids, list) or not ids:
        return "NO_IDENTIFIERS_PROVIDED"
    if len(ids) > max_ids:
        return "TOO_MANY_USER_IDENTIFIERS"
    for ident in ids:
        if not isinstance(ident, Mapping) or len(ident) != 1:
            return "INVALID_AUDIENCE_MEMBER"
        ((kind, val),) = ident.items()
        if kind in ("hashed_email", "hashed_phone_number"):
            if problem := _check_identifier_value(val, strict=strict):
                return problem
        elif kind == "address_info":
            if not isinstance(val, Mapping) or set(val) != ADDRESS_KEYS:
                return "INVALID_AUDIENCE_MEMBER"
            for name in ("hashed_first_name", "hashed_last_name"):
                if problem := _check_identifier_value(val[name], strict=strict):
                    return problem
            if not isinstance(val["country_code"], str) or not re.match(r"^[A-Z]{2}$", val["country_code"]):
                return "INVALID_REGION_CODE"
            if not isinstance(val["postal_code"], str) or not re.match(
                r"^[A-Za-z0-9][A-Za-z0-9 -]{0,9}$", val["postal_code"]
            ):
                return "INVALID_POSTAL_CODE"
        else:
            return "INVALID_AUDIENCE_MEMBER"
    return None


def summarize(label: str, results: Sequence[RowResult]) -> None:
    counts: dict[str, int] = {}
    for result in results:
        counts[result.outcome.value] = counts.get(result.outcome.value, 0) + 1
    log.info("%s: %d rows %s", label, len(results), dict(sorted(counts.items())))


RATE_LIMIT_CODES = frozenset({"RESOURCE_TEMPORARILY_EXHAUSTED", "RESOURCE_EXHAUSTED", "RATE_LIMIT_EXCEEDED"})


def results_for_failure(
    exc: CallFailed, keys: Sequence[str], *, api: str, method: str, customer_id: str
) -> list[RowResult]:
    """Per-row results for a request that failed as a whole (or raise when the run must stop).

    Retries that ran out leave the rows DEFERRED (sent again next run), except a rate limit that
    never cleared, which stops the run like a spent daily quota.
    """
    failure = exc.failure
    if exc.exhausted:
        if failure.code in RATE_LIMIT_CODES:
            raise_stop(
                CallFailure(Kind.QUOTA, failure.code, failure.request_id),
                api=api,
                method=method,
                customer_id=customer_id,
            )
        log.warning("%s: %s persisted after retries; %d rows deferred", method, failure.code, len(keys))
        return [RowResult(k, Outcome.DEFERRED, failure.code, failure.request_id) for k in keys]
    raise_stop(failure, api=api, method=method, customer_id=customer_id)
    outcome = Outcome.DEFERRED if failure.kind is Kind.DEFER_ALL else Outcome.REJECTED
    return [RowResult(k, outcome, failure.code, failure.request_id) for k in keys]


def __getattr__(name: str) -> Any:
    """``make_google_destinations`` and ``doctor_google`` live in ``google_setup``.

    ``google_setup`` imports this module, so they are resolved lazily here: callers can take
    everything Google from one place without an import cycle (typed callers may prefer
    ``etl.destinations.google_setup``, since this route is typed ``Any``).
    """
    if name in ("make_google_destinations", "doctor_google"):
        from etl.destinations import google_setup

        return getattr(google_setup, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
