"""The Google Ads API v26 half of the sandbox: conversion uploads and the shared error model.

Contract: ``shared/reference/ad-platforms.md`` A1/A2 (limits, validation, error codes) and
``shared/reference/stack.md`` section 4 (generic gRPC handlers with the proto-plus
``serialize``/``deserialize``; errors as a ``GoogleAdsFailure`` in the
``...googleadsfailure-bin`` trailing metadata, partial failures in ``partial_failure_error``).
Error messages are fixed texts: never a value from the request. Customer Match jobs are in
``google_ads_jobs``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.ads.googleads.v26.errors.types.errors import (
    ErrorCode,
    ErrorLocation,
    GoogleAdsError,
    GoogleAdsFailure,
)
from google.ads.googleads.v26.services.types import conversion_upload_service as cus
from google.protobuf import any_pb2
from google.rpc import status_pb2

from etl.destinations.google_common import CONVERSION_ACTION, DATE_TIME, HEX64

if TYPE_CHECKING:
    from etl.sandbox.google import GoogleSandbox

PREFIX = "google.ads.googleads.v26.services."
FAILURE_KEY = "google.ads.googleads.v26.errors.googleadsfailure-bin"
FAILURE_TYPE_URL = "type.googleapis.com/google.ads.googleads.v26.errors.GoogleAdsFailure"
Err = tuple[str, str, list[tuple[str, int | None]]]  # category, enum name, field path

# failure kind -> (gRPC status, error category, enum name); None: no GoogleAdsFailure
_KINDS: dict[str, tuple[grpc.StatusCode, str | None, str | None]] = {
    "transient": (grpc.StatusCode.INTERNAL, "internal_error", "TRANSIENT_ERROR"),
    "internal": (grpc.StatusCode.INTERNAL, "internal_error", "INTERNAL_ERROR"),
    "unavailable": (grpc.StatusCode.UNAVAILABLE, None, None),
    "deadline": (grpc.StatusCode.DEADLINE_EXCEEDED, None, None),
    "rate_limit": (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "quota_error",
        "RESOURCE_TEMPORARILY_EXHAUSTED",
    ),
    "daily_quota": (grpc.StatusCode.RESOURCE_EXHAUSTED, "quota_error", "RESOURCE_EXHAUSTED"),
    "concurrent": (grpc.StatusCode.ABORTED, "database_error", "CONCURRENT_MODIFICATION"),
    "unauthorized": (
        grpc.StatusCode.INVALID_ARGUMENT,
        "conversion_upload_error",
        "UNAUTHORIZED_CUSTOMER",
    ),
    "terms": (
        grpc.StatusCode.INVALID_ARGUMENT,
        "conversion_upload_error",
        "CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS",
    ),
    "no_action": (
        grpc.StatusCode.INVALID_ARGUMENT,
        "conversion_upload_error",
        "NO_CONVERSION_ACTION_FOUND",
    ),
    "permission_denied": (
        grpc.StatusCode.PERMISSION_DENIED,
        "authorization_error",
        "USER_PERMISSION_DENIED",
    ),
    "unauthenticated": (
        grpc.StatusCode.UNAUTHENTICATED,
        "authentication_error",
        "AUTHENTICATION_ERROR",
    ),
    "too_recent_action": (
        grpc.StatusCode.INVALID_ARGUMENT,
        "conversion_upload_error",
        "TOO_RECENT_CONVERSION_ACTION",
    ),
    "account_refused": (grpc.StatusCode.INVALID_ARGUMENT, "header_error", "INVALID_LOGIN_CUSTOMER_ID"),
    "malformed": (grpc.StatusCode.INVALID_ARGUMENT, None, None),
}
_CM_OVERRIDES = {  # Customer Match methods report account problems with their own enums
    "unauthorized": (
        grpc.StatusCode.PERMISSION_DENIED,
        "authorization_error",
        "USER_PERMISSION_DENIED",
    ),
    "terms": (
        grpc.StatusCode.INVALID_ARGUMENT,
        "offline_user_data_job_error",
        "CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS",
    ),
    "no_action": (
        grpc.StatusCode.INVALID_ARGUMENT,
        "offline_user_data_job_error",
        "INVALID_USER_LIST_ID",
    ),
}


def _error(category: str, name: str, path: list[tuple[str, int | None]]) -> GoogleAdsError:
    enum = ErrorCode.meta.fields[category].enum
    elements = [
        ErrorLocation.FieldPathElement(field_name=f, index=i)
        if i is not None
        else ErrorLocation.FieldPathElement(field_name=f)
        for f, i in path
    ]
    return GoogleAdsError(
        error_code=ErrorCode(**{category: enum[name]}),
        message=f"sandbox: {name}",
        location=ErrorLocation(field_path_elements=elements),
    )


def _failure(errors: list[Err], request_id: str) -> GoogleAdsFailure:
    return GoogleAdsFailure(errors=[_error(*e) for e in errors], request_id=request_id)


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, errors: list[Err], rid: str) -> None:
    metadata: list[tuple[str, str | bytes]] = [("request-id", rid)]
    if errors:
        metadata.append((FAILURE_KEY, GoogleAdsFailure.serialize(_failure(errors, rid))))
    context.set_trailing_metadata(tuple(metadata))
    context.abort(code, f"sandbox: {errors[0][1] if errors else code.name}")


def partial_status(errors: list[Err], rid: str) -> status_pb2.Status:
    if not errors:
        return status_pb2.Status()
    detail = any_pb2.Any(type_url=FAILURE_TYPE_URL, value=GoogleAdsFailure.serialize(_failure(errors, rid)))
    return status_pb2.Status(code=3, message="sandbox: partial failure", details=[detail])


class AdsCall:
    """Common preamble of every handler: record, injected failures, developer token."""

    def __init__(
        self, sandbox: GoogleSandbox, method: str, request: Any, context: grpc.ServicerContext
    ) -> None:
        self.rid = sandbox.record(method, request)
        self.context = context
        kind = sandbox.take_failure(method)
        if kind is not None:
            table = {**_KINDS, **_CM_OVERRIDES} if method != "UploadClickConversions" else _KINDS
            code, category, name = table[kind]
            abort(context, code, [(category, name, [])] if category and name else [], self.rid)
        metadata = dict(context.invocation_metadata())
        if not metadata.get("developer-token"):
            abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                [("authentication_error", "DEVELOPER_TOKEN_INVALID", [])],
                self.rid,
            )
        context.set_trailing_metadata((("request-id", self.rid),))


def _conversion_errors(
    sandbox: GoogleSandbox, customer_id: str, c: Any, i: int, seen: dict[str, set[Any]]
) -> Err | None:
    def err(category: str, name: str, field: str | None = None) -> Err:
        path: list[tuple[str, int | None]] = [("conversions", i)]
        return category, name, path + ([(field, None)] if field else [])

    cu = "conversion_upload_error"
    match = CONVERSION_ACTION.match(c.conversion_action)
    if match is None or match.group(1) != customer_id:
        return err(cu, "NO_CONVERSION_ACTION_FOUND", "conversion_action")
    action = match.group(2)
    if not DATE_TIME.match(c.conversion_date_time):
        return err("date_error", "INVALID_STRING_DATE_TIME_SECONDS_WITH_OFFSET", "conversion_date_time")
    if c.gbraid and c.wbraid:
        return err(cu, "GBRAID_WBRAID_BOTH_SET", "wbraid")
    if c.gclid and (c.gbraid or c.wbraid):
        return err("field_error", "VALUE_MUST_BE_UNSET", "gbraid" if c.gbraid else "wbraid")
    if len(c.user_identifiers) > 5:
        return err("collection_size_error", "TOO_MANY", "user_identifiers")
    for ident in c.user_identifiers:
        kind = type(ident).pb(ident).WhichOneof("identifier")
        if kind not in ("hashed_email", "hashed_phone_number"):
            return err(cu, "UNSUPPORTED_USER_IDENTIFIER", "user_identifiers")
        if not HEX64.match(getattr(ident, kind)):
            return err(cu, "INVALID_USER_IDENTIFIER", "user_identifiers")
    click = c.gclid or c.gbraid or c.wbraid
    if not click and not c.user_identifiers:
        return err("field_error", "REQUIRED", "gclid")
    if not click and not sandbox.leads_enabled:
        return err(cu, "CUSTOMER_NOT_ENABLED_ENHANCED_CONVERSIONS_FOR_LEADS")
    if c.consent.ad_user_data.name not in ("GRANTED", "DENIED"):
        return err("field_error", "REQUIRED", "consent")
    if c.order_id:
        if "@" in c.order_id:
            return err(cu, "ORDER_ID_CONTAINS_PII", "order_id")
        if (action, c.order_id) in seen["orders"]:
            return err(cu, "DUPLICATE_ORDER_ID", "order_id")
        seen["orders"].add((action, c.order_id))
        if (action, c.order_id) in sandbox.used_orders:
            return err(cu, "ORDER_ID_ALREADY_IN_USE", "order_id")
    if sandbox.action_is_recent(action):
        return err(cu, "TOO_RECENT_CONVERSION_ACTION", "conversion_action")
    if click:
        problem = sandbox.click_problem(click)
        if problem:
            return err("internal_error" if problem == "INTERNAL_ERROR" else cu, problem, "gclid")
        triple = (click, c.conversion_date_time, action)
        if triple in seen["clicks"]:
            return err(cu, "DUPLICATE_CLICK_CONVERSION_IN_REQUEST", "gclid")
        seen["clicks"].add(triple)
        if triple in sandbox.click_conversions:
            return err(cu, "CLICK_CONVERSION_ALREADY_EXISTS", "gclid")
    return None


def _upload(sandbox: GoogleSandbox) -> Callable[[Any, grpc.ServicerContext], Any]:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        call = AdsCall(sandbox, "UploadClickConversions", request, context)
        if not request.partial_failure:
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                [("partial_failure_error", "PARTIAL_FAILURE_MODE_REQUIRED", [])],
                call.rid,
            )
        if len(request.conversions) > 2000:
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                [("conversion_upload_error", "TOO_MANY_CONVERSIONS_IN_REQUEST", [])],
                call.rid,
            )
        errors: list[Err] = []
        results = []
        seen: dict[str, set[Any]] = {"orders": set(), "clicks": set()}
        with sandbox.lock:
            for i, conversion in enumerate(request.conversions):
                problem = _conversion_errors(sandbox, request.customer_id, conversion, i, seen)
                if problem:
                    errors.append(problem)
                    results.append(cus.ClickConversionResult())
                    continue
                results.append(
                    cus.ClickConversionResult(
                        gclid=conversion.gclid,
                        gbraid=conversion.gbraid,
                        wbraid=conversion.wbraid,
                        conversion_action=conversion.conversion_action,
                        conversion_date_time=conversion.conversion_date_time,
                    )
                )
                if not request.validate_only:
                    action = conversion.conversion_action.rsplit("/", 1)[-1]
                    click = conversion.gclid or conversion.gbraid or conversion.wbraid
                    if conversion.order_id:
                        sandbox.used_orders.add((action, conversion.order_id))
                    if click:
                        sandbox.click_conversions.add((click, conversion.conversion_date_time, action))
                    sandbox.accepted[conversion.order_id] += 1
        if sandbox.take_unlocated_error():
            errors.append(("internal_error", "INTERNAL_ERROR", []))
        return cus.UploadClickConversionsResponse(
            partial_failure_error=partial_status(errors, call.rid),
            results=[] if request.validate_only else results,
            job_id=sandbox.next_id(),
        )

    return handle


def upload_handlers(sandbox: GoogleSandbox) -> list[grpc.GenericRpcHandler]:
    """The generic gRPC handler of ``ConversionUploadService``."""
    return [
        grpc.method_handlers_generic_handler(
            PREFIX + "ConversionUploadService",
            {
                "UploadClickConversions": unary(
                    _upload(sandbox),
                    cus.UploadClickConversionsRequest,
                    cus.UploadClickConversionsResponse.serialize,
                )
            },
        )
    ]


def unary(fn: Any, request: Any, response_serializer: Any) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        fn, request_deserializer=request.deserialize, response_serializer=response_serializer
    )
