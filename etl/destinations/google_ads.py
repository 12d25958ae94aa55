"""Google Ads API adapter (``google-ads``, API v26): click conversions, client, error mapping.

For deployments whose developer token is already allowlisted; new ones use the Data Manager API
(``google_datamanager``). Contract: issue #3, ``docs/google.md``; fields, limits and error codes
from ``shared/reference/ad-platforms.md`` A1, A2 and A4.

Conversions go through ``UploadClickConversions`` with ``partial_failure=True``: each failed row
comes back in ``partial_failure_error`` (a ``GoogleAdsFailure`` whose
``location.field_path_elements[0].index`` is the row) and is mapped to a per-row result. Customer
Match (``OfflineUserDataJobService``) lives in ``google_ads_audience`` and shares the client
builders and the error mapping below.

The library logs a fault line ("Request made: ... IsFault: True, FaultMessage: ...") on every
failed call and, at INFO/DEBUG, whole request bodies; ``quiet_sdk_loggers`` pins its logger to
WARNING and strips the free-text FaultMessage, so only method, customer id and request id remain.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from google.ads.googleads.client import GoogleAdsClient
from google.ads.googleads.errors import GoogleAdsException
from google.ads.googleads.v26.common.types import consent as consent_types
from google.ads.googleads.v26.common.types import offline_user_data as oud
from google.ads.googleads.v26.enums.types.consent_status import ConsentStatusEnum
from google.ads.googleads.v26.errors.types.errors import GoogleAdsFailure
from google.ads.googleads.v26.services.types import conversion_upload_service as cus
from google.api_core import exceptions as core_exceptions

from etl.destinations.base import Outcome, RowResult
from etl.destinations.google_common import (
    CONFIG_CODES,
    DEFERRED_CODES,
    MAX_ADS_CONVERSION_IDENTIFIERS,
    MAX_CONVERSIONS_PER_REQUEST,
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
    outcome_for,
    raise_stop,
    results_for_failure,
    summarize,
)
from etl.destinations.google_setup import quiet_sdk_loggers

if TYPE_CHECKING:
    from etl.sandbox.google import GoogleSandbox

API_VERSION = "v26"
FAILURE_METADATA_KEY = f"google.ads.googleads.{API_VERSION}.errors.googleadsfailure-bin"
log = logging.getLogger("etl.destinations.google")


def build_sandbox_ads_client(sandbox: GoogleSandbox, login_customer_id: str | None) -> Any:
    """A real ``GoogleAdsClient`` aimed at the sandbox (TLS; roots set by the sandbox)."""
    from google.oauth2.credentials import Credentials

    return GoogleAdsClient(
        credentials=Credentials(token="sandbox-token"),
        developer_token="sandbox-developer-token",
        endpoint=sandbox.endpoint,
        login_customer_id=login_customer_id,
        use_proto_plus=True,
        version=API_VERSION,
    )


def build_live_ads_client(settings: Mapping[str, str], customer_id: str) -> Any:
    """A ``GoogleAdsClient`` from resolved credential settings (see ``google_setup``).

    The library refreshes an OAuth token while building the client, so a refused refresh
    surfaces here.

    Raises:
        DestinationConfigError: the credentials were refused (no value in the message).
    """
    from google.auth import exceptions as auth_exceptions

    try:
        return GoogleAdsClient.load_from_dict({**settings, "use_proto_plus": True}, version=API_VERSION)
    except auth_exceptions.RefreshError:
        raise_stop(
            CallFailure(Kind.CONFIG, "OAUTH_REFRESH_FAILED"),
            api="Ads API",
            method="token refresh",
            customer_id=customer_id,
        )
        raise


def _failure_codes(exc: BaseException) -> tuple[list[tuple[str, str]], str | None, Any]:
    """(category, enum name) of every error, the request id and the gRPC status of a failure."""
    failure: Any = None
    request_id: str | None = None
    status: Any = None
    if isinstance(exc, GoogleAdsException):
        failure, request_id = exc.failure, exc.request_id
        status = exc.error.code() if hasattr(exc.error, "code") else None
    else:
        # INTERNAL and RESOURCE_EXHAUSTED bypass GoogleAdsException in the library and arrive
        # as a raw grpc.RpcError or wrapped by google.api_core; the failure is in the trailers
        call = exc.response if isinstance(exc, core_exceptions.GoogleAPICallError) else exc
        if isinstance(exc, core_exceptions.GoogleAPICallError):
            status = exc.grpc_status_code
        elif hasattr(exc, "code"):
            status = exc.code()
        metadata = call.trailing_metadata() if hasattr(call, "trailing_metadata") else None
        for key, value in metadata or ():
            if key == FAILURE_METADATA_KEY:
                failure = GoogleAdsFailure.deserialize(value)
            elif key == "request-id":
                request_id = str(value)
    codes = [_code_of(err) for err in failure.errors] if failure is not None else []
    return (
        codes,
        request_id or (failure.request_id if failure is not None else None) or None,
        status,
    )


def _code_of(error: Any) -> tuple[str, str]:
    code = error.error_code
    pb = type(code).pb(code) if hasattr(type(code), "pb") else code  # proto-plus or protobuf
    category = pb.WhichOneof("error_code") or "unknown"
    number = getattr(pb, category, 0)
    enum = pb.DESCRIPTOR.fields_by_name[category].enum_type if category != "unknown" else None
    value = enum.values_by_number.get(number) if enum is not None else None
    return category, value.name if value is not None else "UNKNOWN"


def classify_ads_error(exc: BaseException) -> CallFailure | None:
    """Map a google-ads exception onto a retry / stop / record decision (ad-platforms.md A4)."""
    if not isinstance(exc, GoogleAdsException | grpc.RpcError | core_exceptions.GoogleAPICallError):
        return classify_auth_error(exc)
    codes, rid, status = _failure_codes(exc)
    names = [name for _, name in codes]
    if ("quota_error", "RESOURCE_EXHAUSTED") in codes:
        return CallFailure(Kind.QUOTA, "RESOURCE_EXHAUSTED", rid)
    for category, name in codes:
        if name in CONFIG_CODES or category in ("authentication_error", "authorization_error"):
            return CallFailure(Kind.CONFIG, name, rid)
    for name in names:
        if name in TRANSIENT_CODES:
            return CallFailure(Kind.RETRY, name, rid)
    if status in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,  # without details: the per-minute (HTTP 429) limit
    ):
        return CallFailure(Kind.RETRY, status.name, rid)
    if status in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return CallFailure(Kind.CONFIG, status.name, rid)
    if any(name in DEFERRED_CODES for name in names):
        return CallFailure(Kind.DEFER_ALL, next(n for n in names if n in DEFERRED_CODES), rid)
    if names:
        # uploads run in partial-failure mode, so Google judges rows one by one; a request
        # refused as a whole (a login customer ID, an allowlist, a malformed request) says nothing
        # final about its rows: the run stops and they stay planned, rather than each being
        # recorded as rejected for good
        return CallFailure(Kind.CONFIG, names[0], rid)
    # no GoogleAdsFailure: a dropped stream or cancelled call says nothing about the rows;
    # retried, and if it persists the rows come back next run (never rejected for good)
    code = status.name if status is not None else "UNKNOWN"
    if status in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED):
        return CallFailure(Kind.RETRY, code, rid)
    return CallFailure(Kind.DEFER_ALL, code, rid)


def partial_failures(status: Any) -> tuple[dict[int, list[str]], list[str], str | None]:
    """Row index -> error names, the names of errors that locate no row, and the request id,
    from a ``partial_failure_error`` google.rpc.Status."""
    by_index: dict[int, list[str]] = {}
    unlocated: list[str] = []
    request_id = None
    for detail in getattr(status, "details", ()):
        failure = GoogleAdsFailure.deserialize(detail.value)
        request_id = request_id or failure.request_id or None
        for error in failure.errors:
            path = error.location.field_path_elements
            if not path or "index" not in path[0]:
                unlocated.append(_code_of(error)[1])
                continue
            by_index.setdefault(int(path[0].index), []).append(_code_of(error)[1])
    return by_index, unlocated, request_id


def _pick(codes: list[str]) -> str:
    for code in codes:
        if outcome_for(code) is Outcome.ALREADY_SENT:
            return code
    for code in codes:
        if outcome_for(code) is Outcome.DEFERRED:
            return code
    return codes[0]


class GoogleAdsConversions:
    """``ConversionDestination`` over ``ConversionUploadService.UploadClickConversions``."""

    name = "google_conversions"
    max_batch = MAX_CONVERSIONS_PER_REQUEST

    def __init__(self, client: Any, customer_id: str, *, policy: RetryPolicy) -> None:
        quiet_sdk_loggers()
        self._service = client.get_service("ConversionUploadService", version=API_VERSION)
        self._customer_id = customer_id
        self._policy = policy

    def send(self, rows: Sequence[dict[str, Any]], *, validate_only: bool = False) -> list[RowResult]:
        """Upload ``rows`` (split at 2,000); one result per row. See ``docs/google.md``.

        Raises:
            DestinationConfigError: the account is not set up (named code and customer id).
            QuotaExhausted: the daily operations quota is spent.
        """
        results: list[RowResult] = []
        with carrying(results):
            for chunk in chunked(rows, self.max_batch):
                results.extend(self._send_chunk(chunk, validate_only))
        summarize("google_ads UploadClickConversions", results)
        return results

    def _send_chunk(self, rows: Sequence[dict[str, Any]], validate_only: bool) -> list[RowResult]:
        results: list[RowResult] = []
        sendable: list[dict[str, Any]] = []
        for row in rows:
            code = check_conversion_row(row, strict=False, max_ids=MAX_ADS_CONVERSION_IDENTIFIERS)
            if code:
                results.append(
                    RowResult(str(row.get("order_id", "")), Outcome.REJECTED, code, transmitted=False)
                )
            else:
                sendable.append(row)
        if not sendable:
            return results
        request = cus.UploadClickConversionsRequest(
            customer_id=self._customer_id,
            conversions=[_click_conversion(row) for row in sendable],
            partial_failure=True,
            validate_only=validate_only,
        )
        try:
            response = call_with_retry(
                lambda: self._service.upload_click_conversions(request=request),
                classify_ads_error,
                self._policy,
                label="google_ads UploadClickConversions",
            )
        except CallFailed as exc:
            keys = [row["order_id"] for row in sendable]
            return results + results_for_failure(
                exc,
                keys,
                api="Ads API",
                method="UploadClickConversions",
                customer_id=self._customer_id,
            )
        by_index, unlocated, request_id = partial_failures(response.partial_failure_error)
        if unlocated:
            # an error that names no row may concern any of them: the rows with no error of their
            # own are sent again next run (a re-sent order_id is answered as already there)
            log.warning("google_ads UploadClickConversions: %d error(s) naming no row (%s, request %s); "
                        "the rows without an error of their own are deferred", len(unlocated),
                        ", ".join(sorted(set(unlocated))), request_id)  # fmt: skip
        stop = next(
            (c for codes in [*by_index.values(), unlocated] for c in codes if c in CONFIG_CODES), None
        )
        for index, row in enumerate(sendable):
            own = by_index.get(index)
            if not CONFIG_CODES.isdisjoint(own or unlocated):
                # stays planned: the account problem is fixed first, then it goes again (every
                # row with one, whichever account problem the stop names)
                continue
            if own:
                code = _pick(own)
                results.append(RowResult(row["order_id"], outcome_for(code), code, request_id))
            elif unlocated:
                results.append(
                    RowResult(row["order_id"], Outcome.DEFERRED, f"unlocated/{_pick(unlocated)}", request_id)
                )
            else:
                results.append(RowResult(row["order_id"], Outcome.ACCEPTED, None, request_id))
        if stop:
            # partial failure: the other rows of this request were applied; they travel with
            # the stop and are recorded, not sent again
            with carrying(results):
                raise_stop(
                    CallFailure(Kind.CONFIG, stop, request_id),
                    api="Ads API",
                    method="UploadClickConversions",
                    customer_id=self._customer_id,
                )
        return results


def _click_conversion(row: Mapping[str, Any]) -> Any:
    conversion = cus.ClickConversion(
        conversion_action=row["conversion_action"],
        conversion_date_time=row["conversion_date_time"],
        order_id=row["order_id"],
    )
    if row.get("conversion_value") is not None:
        conversion.conversion_value = float(row["conversion_value"])
    if row.get("currency_code"):
        conversion.currency_code = row["currency_code"]
    for kind in ("gclid", "gbraid", "wbraid"):
        if row.get(kind):
            setattr(conversion, kind, row[kind])
    for ident in row.get("user_identifiers") or ():
        conversion.user_identifiers.append(oud.UserIdentifier(**ident))
    conversion.consent = consent_types.Consent(
        ad_user_data=getattr(ConsentStatusEnum.ConsentStatus, row["consent"]["ad_user_data"])
    )
    return conversion
