"""Data Manager API adapter (``google-ads-datamanager``): conversions, client, error mapping.

The default Google path: Google stopped taking new Google Ads API integrations for Customer
Match (2026-04-01) and offline click conversions (2026-06-15). Contract: issue #3,
``docs/google.md``; limits from ``shared/reference/ad-platforms.md`` A5.

The API fails a whole request for one bad item (no partial failure), so every row is checked
before batching (64-hex hashes, at most 10 identifiers, only the allowed keys), and a request
still refused with INVALID_ARGUMENT is bisected until the bad rows stand alone (rejected with
the API's ``ErrorInfo.reason``) while the good ones go through. There is no per-row dedup answer
(success means ACCEPTED), and nothing we build on says a re-sent ``transaction_id`` is
de-duplicated: a re-send is assumed to count twice, so the ledger and the lease avoid them.
Outbox rows keep the Google Ads API shape (SPEC section 5) and are mapped onto Data Manager
messages here: order_id -> transaction_id, conversion_date_time -> event_timestamp,
gclid/gbraid/wbraid -> ad_identifiers, hashed_email -> email_address, hashed_phone_number ->
phone_number, address_info -> address. Customer Match members live in
``google_datamanager_audience`` and share the client builders and error mapping below.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from google.ads import datamanager_v1 as dm
from google.api_core import exceptions as core_exceptions
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2

from etl.confirm import RequestStatus
from etl.destinations.base import Outcome, RowResult
from etl.destinations.google_common import (
    CONFIG_CODES,
    DEFERRED_CODES,
    MAX_CONVERSIONS_PER_REQUEST,
    MAX_DM_DESTINATIONS,
    MAX_DM_IDENTIFIERS,
    TRANSIENT_CODES,
    CallFailed,
    CallFailure,
    Kind,
    RetryPolicy,
    call_with_retry,
    carrying,
    check_conversion_row,
    chunked,
    classify_auth_error,
    results_for_failure,
    send_bisecting,
    summarize,
)
from etl.destinations.google_setup import quiet_sdk_loggers

if TYPE_CHECKING:
    from etl.sandbox.google import GoogleSandbox

SCOPE = "https://www.googleapis.com/auth/datamanager"
API = "Data Manager API"
TIMEOUT_SECONDS = 120.0
log = logging.getLogger("etl.destinations.google")
_CONSENT = {"GRANTED": dm.ConsentStatus.CONSENT_GRANTED, "DENIED": dm.ConsentStatus.CONSENT_DENIED}
_RETRY_STATUS = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.ABORTED,
}


def build_sandbox_dm_client(sandbox: GoogleSandbox) -> dm.IngestionServiceClient:
    """A real ``IngestionServiceClient`` on a TLS channel to the sandbox (explicit roots)."""
    from google.ads.datamanager_v1.services.ingestion_service.transports import (
        IngestionServiceGrpcTransport,
    )

    channel = grpc.secure_channel(
        sandbox.endpoint, grpc.ssl_channel_credentials(root_certificates=sandbox.root_certificates)
    )
    return dm.IngestionServiceClient(transport=IngestionServiceGrpcTransport(channel=channel))


def build_live_dm_client(credentials: Any) -> dm.IngestionServiceClient:
    return dm.IngestionServiceClient(credentials=credentials)


_UNEXPLAINED_RETRY = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED)
# INVALID_ARGUMENT reasons about a row's content (ErrorReason of google.ads.datamanager.v1):
# the request is bisected down to the rows at fault, which alone are recorded as rejected
ROW_REASONS = frozenset(
    {
        "INVALID_ARGUMENT",
        "REQUIRED_FIELD_MISSING",
        "INVALID_FORMAT",
        "INVALID_HEX_ENCODING",
        "INVALID_SHA256_FORMAT",  # what our sandbox answers, after the Google Ads API's reason
        "INVALID_BASE64_ENCODING",
        "INVALID_POSTAL_CODE",
        "INVALID_COUNTRY_CODE",
        "INVALID_REGION_CODE",
        "INVALID_SUBDIVISION_CODE",
        "INVALID_ENUM_VALUE",
        "INVALID_AUDIENCE_MEMBER",
        "TOO_MANY_USER_IDENTIFIERS",
        "INVALID_MOBILE_ID_FORMAT",
        "INVALID_NUMBER_FORMAT",
        "INVALID_CURRENCY_CODE",
        "INVALID_EVENT",
        "NO_IDENTIFIERS_PROVIDED",
        "EVENT_TIME_INVALID",
        "FIELD_VALUE_TOO_LONG",
        "FIELD_VALUE_TOO_SHORT",
        "TOO_MANY_ELEMENTS",
        "TOO_FEW_ELEMENTS",
        "INVALID_COUPON_CODE",
        "INVALID_CUSTOM_VARIABLE_VALUE",
        "CUSTOM_VARIABLE_VALUE_CONTAINS_PII",
        "INVALID_AD_IDENTIFIER_FOR_ACCOUNT",
    }
)


def classify_dm_error(exc: BaseException) -> CallFailure | None:
    """Map a Data Manager API error (google.rpc.Status with ErrorInfo) onto a decision."""
    if not isinstance(exc, core_exceptions.GoogleAPICallError):
        return classify_auth_error(exc)
    status = exc.grpc_status_code
    reason = exc.reason or (status.name if status is not None else "UNKNOWN")
    request_id = next(
        (d.request_id for d in exc.details if isinstance(d, error_details_pb2.RequestInfo)), None
    )
    if status is grpc.StatusCode.RESOURCE_EXHAUSTED:
        limit = (exc.metadata or {}).get("quota_limit", "")
        if "PerDay" in limit or "per day" in limit.lower():
            return CallFailure(Kind.QUOTA, "RESOURCE_EXHAUSTED", request_id)
        return CallFailure(Kind.RETRY, "RATE_LIMIT_EXCEEDED", request_id)
    if reason in TRANSIENT_CODES or status in _RETRY_STATUS:
        return CallFailure(Kind.RETRY, reason, request_id)
    if reason in CONFIG_CODES:
        return CallFailure(Kind.CONFIG, reason, request_id)
    if status in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return CallFailure(Kind.CONFIG, status.name, request_id)
    if reason in DEFERRED_CODES:
        return CallFailure(Kind.DEFER_ALL, reason, request_id)
    if status is grpc.StatusCode.INVALID_ARGUMENT and (exc.reason is None or reason in ROW_REASONS):
        return CallFailure(Kind.INVALID, reason, request_id)
    if exc.reason is None:
        # no reason from Google: a dropped stream or cancelled call says nothing about the rows;
        # retried, and if it persists the rows come back next run (never rejected for good)
        if status in _UNEXPLAINED_RETRY:
            return CallFailure(Kind.RETRY, reason, request_id)
        return CallFailure(Kind.DEFER_ALL, reason, request_id)
    # a reason about the account, the destination or the request (a login account mismatch, a
    # list of the wrong type, an allowlist): bisecting would record every row as rejected for
    # good, one request per row; the run stops instead and the rows stay planned
    return CallFailure(Kind.CONFIG, reason, request_id)


def _timestamp(text: str) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(dt.datetime.fromisoformat(text).astimezone(dt.UTC))
    return stamp


def _identifier(kind: str, value: Any) -> dm.UserIdentifier:
    if kind == "hashed_email":
        return dm.UserIdentifier(email_address=value)
    if kind == "hashed_phone_number":
        return dm.UserIdentifier(phone_number=value)
    return dm.UserIdentifier(
        address=dm.AddressInfo(
            given_name=value["hashed_first_name"],
            family_name=value["hashed_last_name"],
            region_code=value["country_code"],
            postal_code=value["postal_code"],
        )
    )


def user_data(identifiers: Sequence[Mapping[str, Any]]) -> dm.UserData:
    return dm.UserData(user_identifiers=[_identifier(*next(iter(ident.items()))) for ident in identifiers])


class DataManagerBase:
    """What both Data Manager adapters share: the client, destinations, one retried call."""

    def __init__(
        self,
        client: dm.IngestionServiceClient,
        customer_id: str,
        login_customer_id: str | None,
        policy: RetryPolicy,
    ) -> None:
        quiet_sdk_loggers()
        self._client = client
        self._customer_id = customer_id
        self._login = login_customer_id
        self._policy = policy

    def _destination(self, product_destination_id: str, reference: str = "") -> dm.Destination:
        account = dm.ProductAccount.AccountType.GOOGLE_ADS
        destination = dm.Destination(
            reference=reference,
            operating_account=dm.ProductAccount(account_id=self._customer_id, account_type=account),
            product_destination_id=product_destination_id,
        )
        if self._login and self._login != self._customer_id:
            destination.login_account = dm.ProductAccount(account_id=self._login, account_type=account)
        return destination

    def _request(
        self, method: str, call: Callable[[], Any], keys: Sequence[str], *, bisect: bool = True
    ) -> tuple[Any, list[RowResult] | None]:
        """Run one call; a content refusal propagates (for the caller to bisect) unless
        ``bisect`` is off (a call with no rows to split), others become row results."""
        try:
            return call_with_retry(call, classify_dm_error, self._policy, label=f"datamanager {method}"), None
        except CallFailed as exc:
            if bisect and exc.failure.kind is Kind.INVALID and not exc.exhausted:
                raise
            return None, results_for_failure(exc, keys, api=API, method=method, customer_id=self._customer_id)

    def request_status(self, request_id: str) -> RequestStatus | None:
        """What processing made of a request this adapter sent (``etl.confirm``), over all its
        destinations: SUCCESS everywhere, FAILED everywhere, or else partial; PROCESSING while
        any destination is. None when the status cannot be read now."""
        request = dm.RetrieveRequestStatusRequest(request_id=request_id)
        try:
            response = call_with_retry(
                lambda: self._client.retrieve_request_status(
                    request=request, retry=None, timeout=TIMEOUT_SECONDS
                ),
                classify_dm_error,
                self._policy,
                label="datamanager RetrieveRequestStatus",
            )
        except CallFailed as exc:
            if exc.failure.code == "NOT_FOUND":  # Google does not know the request (any more)
                return RequestStatus("unconfirmed")
            log.warning("datamanager RetrieveRequestStatus: not read now (%s)", exc.failure.code)
            return None
        names = [d.request_status.name for d in response.request_status_per_destination]
        errors: dict[str, int] = {}
        for item in response.request_status_per_destination:
            for count in item.error_info.error_counts:
                reason = _short_reason(count.reason.name)
                errors[reason] = errors.get(reason, 0) + int(count.record_count)
        if not names or any(n not in ("SUCCESS", "FAILED", "PARTIAL_SUCCESS") for n in names):
            return RequestStatus("processing")
        if all(n == "SUCCESS" for n in names):
            return RequestStatus("success", errors)
        if all(n == "FAILED" for n in names):
            return RequestStatus("failed", errors)
        return RequestStatus("partial_success", errors)


def _short_reason(name: str) -> str:
    """``PROCESSING_ERROR_REASON_EVENT_TOO_OLD`` -> ``EVENT_TOO_OLD`` (fits the ledger's code)."""
    for prefix in ("PROCESSING_ERROR_REASON_", "PROCESSING_ERROR_"):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def reject_row(key: str, failure: CallFailure) -> RowResult:
    return RowResult(key, Outcome.REJECTED, failure.code, failure.request_id)


class DataManagerConversions(DataManagerBase):
    """``ConversionDestination`` over ``IngestionService.IngestEvents``."""

    name = "google_conversions"
    max_batch = MAX_CONVERSIONS_PER_REQUEST

    def send(self, rows: Sequence[dict[str, Any]], *, validate_only: bool = False) -> list[RowResult]:
        """Check every row, send the good ones in requests of at most 2,000 events.

        Raises:
            DestinationConfigError: the account is not set up (named code and customer id).
            QuotaExhausted: the project's daily quota is spent.
        """
        results: list[RowResult] = []
        good: list[dict[str, Any]] = []
        for row in rows:
            code = check_conversion_row(row, strict=True, max_ids=MAX_DM_IDENTIFIERS)
            if code:
                results.append(
                    RowResult(str(row.get("order_id", "")), Outcome.REJECTED, code, transmitted=False)
                )
            else:
                good.append(row)
        with carrying(results):
            for chunk in chunked(good, self.max_batch):
                for group in _by_destinations(chunk):
                    results.extend(
                        send_bisecting(
                            group,
                            lambda part: self._ingest(part, validate_only),
                            lambda row, failure: reject_row(row["order_id"], failure),
                        )
                    )
        summarize("datamanager IngestEvents", results)
        return results

    def _ingest(self, rows: Sequence[dict[str, Any]], validate_only: bool) -> list[RowResult]:
        actions = sorted({_action_id(row) for row in rows})
        events = []
        for row in rows:
            action = _action_id(row)
            event = dm.Event(
                transaction_id=row["order_id"],
                event_timestamp=_timestamp(row["conversion_date_time"]),
                destination_references=[f"action-{action}"],
            )
            if row.get("conversion_value") is not None:
                event.conversion_value = float(row["conversion_value"])
            if row.get("currency_code"):
                event.currency = row["currency_code"]
            clicks = {k: row[k] for k in ("gclid", "gbraid", "wbraid") if row.get(k)}
            if clicks:
                event.ad_identifiers = dm.AdIdentifiers(**clicks)
            if row.get("user_identifiers"):
                event.user_data = user_data(row["user_identifiers"])
            if row["consent"]["ad_user_data"] != "GRANTED":
                event.consent = dm.Consent(ad_user_data=_CONSENT[row["consent"]["ad_user_data"]])
            events.append(event)
        request = dm.IngestEventsRequest(
            destinations=[self._destination(a, f"action-{a}") for a in actions],
            events=events,
            consent=dm.Consent(ad_user_data=dm.ConsentStatus.CONSENT_GRANTED),
            encoding=dm.Encoding.HEX,
            validate_only=validate_only,
        )
        keys = [row["order_id"] for row in rows]
        response, failed = self._request(
            "IngestEvents",
            lambda: self._client.ingest_events(request=request, retry=None, timeout=TIMEOUT_SECONDS),
            keys,
        )
        if failed is not None:
            return failed
        return [RowResult(k, Outcome.ACCEPTED, None, response.request_id or None) for k in keys]


def _action_id(row: Mapping[str, Any]) -> str:
    """The conversion action id (last path segment; the format was checked before batching)."""
    return str(row["conversion_action"]).rsplit("/", 1)[-1]


def _by_destinations(rows: Sequence[dict[str, Any]]) -> list[Sequence[dict[str, Any]]]:
    """Split a batch so no request names more than 10 destinations (conversion actions)."""
    groups: list[list[dict[str, Any]]] = []
    seen: list[set[str]] = []
    for row in rows:
        action = row["conversion_action"]
        for group, actions in zip(groups, seen, strict=True):
            if action in actions or len(actions) < MAX_DM_DESTINATIONS:
                group.append(row)
                actions.add(action)
                break
        else:
            groups.append([row])
            seen.append({action})
    return list(groups)
