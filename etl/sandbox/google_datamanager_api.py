"""The Data Manager API half of the sandbox: ``google.ads.datamanager.v1.IngestionService``.

Contract: ``shared/reference/ad-platforms.md`` A5 and Google's error guide for the API: a
fast-fail model (one bad item fails the whole request with INVALID_ARGUMENT), errors as a
``google.rpc.Status`` carrying ``ErrorInfo`` (reason, domain ``datamanager.googleapis.com``),
``BadRequest`` field violations and ``RequestInfo``. Quota errors carry ``ErrorInfo.metadata``
``quota_limit`` (``RequestsPerMinutePerProject`` or, for the daily one,
``RequestsPerDayPerProject``), which is how the adapter tells them apart. Messages never
contain request values.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from google.ads import datamanager_v1 as dm
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from etl.destinations.google_common import HEX64
from etl.sandbox.google import SandboxRequest, identifiers_key

if TYPE_CHECKING:
    from etl.sandbox.google import GoogleSandbox

SERVICE = "google.ads.datamanager.v1.IngestionService"
DOMAIN = "datamanager.googleapis.com"
_C = grpc.StatusCode
# failure kind -> (gRPC status, ErrorInfo reason or None, ErrorInfo metadata)
_KINDS: dict[str, tuple[grpc.StatusCode, str | None, dict[str, str]]] = {
    "transient": (_C.INTERNAL, "INTERNAL_ERROR", {}),
    "internal": (_C.INTERNAL, "INTERNAL_ERROR", {}),
    "unavailable": (_C.UNAVAILABLE, None, {}),
    "deadline": (_C.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", {}),
    "rate_limit": (
        _C.RESOURCE_EXHAUSTED,
        "RESOURCE_EXHAUSTED",
        {"quota_limit": "RequestsPerMinutePerProject", "quota_limit_value": "300"},
    ),
    "daily_quota": (
        _C.RESOURCE_EXHAUSTED,
        "RESOURCE_EXHAUSTED",
        {"quota_limit": "RequestsPerDayPerProject", "quota_limit_value": "100000"},
    ),
    "concurrent": (_C.ABORTED, None, {}),
    "unauthorized": (_C.PERMISSION_DENIED, "PERMISSION_DENIED", {}),
    "terms": (_C.INVALID_ARGUMENT, "TERMS_AND_CONDITIONS_NOT_SIGNED", {}),
    "no_action": (_C.INVALID_ARGUMENT, "INVALID_CONVERSION_ACTION_ID", {}),
    "permission_denied": (_C.PERMISSION_DENIED, "PERMISSION_DENIED", {}),
    "unauthenticated": (_C.UNAUTHENTICATED, None, {}),
    "too_recent_action": (_C.FAILED_PRECONDITION, "CONVERSION_ACTION_TOO_RECENTLY_CREATED", {}),
    "account_refused": (_C.INVALID_ARGUMENT, "DESTINATION_ACCOUNT_TYPE_MISMATCH", {}),
    "malformed": (_C.INVALID_ARGUMENT, None, {}),
}
Violation = tuple[str, str]  # (reason, field path)
_POSTAL = {"US": r"\d{5}(-\d{4})?"}
_FUTURE_GRACE = 24 * 3600  # seconds; a later event time is EVENT_TIME_INVALID


def _abort(
    context: grpc.ServicerContext,
    code: grpc.StatusCode,
    reason: str | None,
    rid: str,
    violations: Sequence[Violation] = (),
    metadata: dict[str, str] | None = None,
) -> None:
    status = status_pb2.Status(code=code.value[0], message=f"sandbox: {reason or code.name}")
    details: list[Any] = [error_details_pb2.RequestInfo(request_id=rid)]
    if reason:
        details.insert(0, error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata or {}))
    if violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=path, description=f"sandbox: {name}", reason=name
                    )
                    for name, path in violations
                ]
            )
        )
    for detail in details:
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    context.abort_with_status(rpc_status.to_status(status))


def _preamble(sandbox: GoogleSandbox, method: str, request: Any, context: grpc.ServicerContext) -> str:
    rid = sandbox.record(method, request)
    kind = sandbox.take_failure(method)
    if kind is not None:
        code, reason, metadata = _KINDS[kind]
        _abort(context, code, reason, rid, metadata=metadata)
    return rid


def _destination_problems(destinations: Any) -> list[Violation]:
    if not 1 <= len(destinations) <= 10:
        return [("TOO_MANY_DESTINATIONS" if destinations else "REQUIRED_FIELD_MISSING", "destinations")]
    problems = []
    references = [d.reference for d in destinations if d.reference]
    if len(references) != len(set(references)):
        problems.append(("DUPLICATE_DESTINATION_REFERENCE", "destinations"))
    for i, d in enumerate(destinations):
        account = d.operating_account
        if (
            not re.fullmatch(r"\d{10}", account.account_id)
            or account.account_type.name != "GOOGLE_ADS"
            or not re.fullmatch(r"\d+", d.product_destination_id)
        ):
            problems.append(("INVALID_DESTINATION", f"destinations[{i}]"))
    return problems


def _identifiers(user_data: Any, path: str) -> tuple[list[dict[str, Any]], list[Violation]]:
    """Outbox-row form of DM identifiers, and what is wrong with them."""
    rows: list[dict[str, Any]] = []
    problems: list[Violation] = []
    if len(user_data.user_identifiers) > 10:
        return rows, [("TOO_MANY_USER_IDENTIFIERS", f"{path}.user_identifiers")]
    for j, ident in enumerate(user_data.user_identifiers):
        where = f"{path}.user_identifiers[{j}]"
        kind = type(ident).pb(ident).WhichOneof("identifier")
        if kind in ("email_address", "phone_number"):
            value = getattr(ident, kind)
            if not re.fullmatch(r"[0-9a-fA-F]*", value):
                problems.append(("INVALID_HEX_ENCODING", where))
            elif not HEX64.match(value):
                problems.append(("INVALID_SHA256_FORMAT", where))
            key = "hashed_email" if kind == "email_address" else "hashed_phone_number"
            rows.append({key: value})
        elif kind == "address":
            a = ident.address
            if not (HEX64.match(a.given_name) and HEX64.match(a.family_name)):
                problems.append(("INVALID_SHA256_FORMAT", where))
            if not re.fullmatch(r"[A-Z]{2}", a.region_code):
                problems.append(("INVALID_REGION_CODE", where))
            if not re.fullmatch(_POSTAL.get(a.region_code, r"[A-Za-z0-9][A-Za-z0-9 -]{0,9}"), a.postal_code):
                problems.append(("INVALID_POSTAL_CODE", where))
            rows.append(
                {
                    "address_info": {
                        "hashed_first_name": a.given_name,
                        "hashed_last_name": a.family_name,
                        "country_code": a.region_code,
                        "postal_code": a.postal_code,
                    }
                }
            )
        else:
            problems.append(("INVALID_FORMAT", where))
    return rows, problems


def _event_problems(sandbox: GoogleSandbox, request: Any) -> list[Violation]:
    problems = _destination_problems(request.destinations)
    if len(request.events) > 2000:
        return [("TOO_MANY_EVENTS", "events"), *problems]
    references = {d.reference for d in request.destinations}
    request_consent = request.consent.ad_user_data.name != "CONSENT_STATUS_UNSPECIFIED"
    for i, event in enumerate(request.events):
        path = f"events[{i}]"
        if not event.transaction_id:
            problems.append(("REQUIRED_FIELD_MISSING", f"{path}.transaction_id"))
        if not event.event_timestamp or event.event_timestamp.timestamp() <= 0:
            problems.append(("REQUIRED_FIELD_MISSING", f"{path}.event_timestamp"))
        elif event.event_timestamp.timestamp() > time.time() + _FUTURE_GRACE:
            problems.append(("EVENT_TIME_INVALID", f"{path}.event_timestamp"))
        if any(ref not in references for ref in event.destination_references):
            problems.append(("INVALID_DESTINATION", f"{path}.destination_references"))
        clicks = [k for k in ("gclid", "gbraid", "wbraid") if getattr(event.ad_identifiers, k)]
        if len(clicks) > 1:
            problems.append(("INVALID_EVENT", f"{path}.ad_identifiers"))
        _, id_problems = _identifiers(event.user_data, f"{path}.user_data")
        problems.extend(id_problems)
        if not clicks and not event.user_data.user_identifiers:
            problems.append(("NO_IDENTIFIERS_PROVIDED", path))
        if event.user_data.user_identifiers and request.encoding.name != "HEX":
            problems.append(("REQUIRED_FIELD_MISSING", "encoding"))
        if not request_consent and event.consent.ad_user_data.name == "CONSENT_STATUS_UNSPECIFIED":
            problems.append(("REQUIRED_FIELD_MISSING", f"{path}.consent"))
        if event.currency and not re.fullmatch(r"[A-Z]{3}", event.currency):
            problems.append(("INVALID_CURRENCY_CODE", f"{path}.currency"))
    return problems


def _ingest_events(sandbox: GoogleSandbox) -> Callable[[Any, grpc.ServicerContext], Any]:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        rid = _preamble(sandbox, "IngestEvents", request, context)
        problems = _event_problems(sandbox, request)
        if problems:
            _abort(context, _C.INVALID_ARGUMENT, problems[0][0], rid, problems)
        if any(sandbox.action_is_recent(d.product_destination_id) for d in request.destinations):
            _abort(context, _C.FAILED_PRECONDITION, "CONVERSION_ACTION_TOO_RECENTLY_CREATED", rid)
        if not request.validate_only:
            owners = [_owner(request.destinations, event) for event in request.events]
            applied = _taken(sandbox, rid, "IngestEvents", request.destinations, "events", owners)
            with sandbox.lock:
                for event in request.events[:applied]:
                    sandbox.accepted[event.transaction_id] += 1
        return dm.IngestEventsResponse(request_id=rid)

    return handle


def _members(sandbox: GoogleSandbox, method: str, *, add: bool) -> Callable[[Any, grpc.ServicerContext], Any]:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        rid = _preamble(sandbox, method, request, context)
        problems = _destination_problems(request.destinations)
        if len(request.audience_members) > 10_000:
            problems.insert(0, ("TOO_MANY_AUDIENCE_MEMBERS", "audience_members"))
        if add and request.terms_of_service.customer_match_terms_of_service_status.name != "ACCEPTED":
            _abort(context, _C.INVALID_ARGUMENT, "TERMS_AND_CONDITIONS_NOT_SIGNED", rid)
        if request.encoding.name != "HEX":
            problems.append(("REQUIRED_FIELD_MISSING", "encoding"))
        keys = []
        for i, member in enumerate(request.audience_members):
            path = f"audience_members[{i}].user_data"
            if not member.user_data.user_identifiers:
                problems.append(("NO_IDENTIFIERS_PROVIDED", path))
                continue
            rows, member_problems = _identifiers(member.user_data, path)
            problems.extend(member_problems)
            keys.append(identifiers_key(rows))
        if problems:
            _abort(context, _C.INVALID_ARGUMENT, problems[0][0], rid, problems)
        if not request.validate_only:
            direction = "create" if add else "remove"
            kind = "add" if add else "remove"
            everywhere = [-1] * len(keys)  # each member goes to every destination of the request
            keys = keys[: _taken(sandbox, rid, method, request.destinations, kind, everywhere)]
            for destination in request.destinations:
                user_list = _user_list(destination)
                sandbox.apply_members(user_list, [(direction, k) for k in keys], clear=False)
        response = dm.IngestAudienceMembersResponse if add else dm.RemoveAudienceMembersResponse
        return response(request_id=rid)

    return handle


def _user_list(destination: Any) -> str:
    account = destination.operating_account.account_id
    return f"customers/{account}/userLists/{destination.product_destination_id}"


def _remove_all(sandbox: GoogleSandbox) -> Callable[[Any, grpc.ServicerContext], Any]:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        rid = _preamble(sandbox, "RemoveAllAudienceMembers", request, context)
        problems = _destination_problems(request.destinations)
        if problems:
            _abort(context, _C.INVALID_ARGUMENT, problems[0][0], rid, problems)
        if not request.validate_only and _taken(
            sandbox, rid, "RemoveAllAudienceMembers", request.destinations, "remove_all", [], whole=True
        ):
            for destination in request.destinations:
                sandbox.apply_members(_user_list(destination), [], clear=True)
        return dm.RemoveAllAudienceMembersResponse(request_id=rid)

    return handle


def _taken(
    sandbox: GoogleSandbox,
    rid: str,
    method: str,
    destinations: Any,
    kind: str,
    owners: list[int],
    *,
    whole: bool = False,
) -> int:
    """Keep a request Data Manager took, for its status; how many of its records (from the
    first) processing applies: all, none (FAILED), or all but the last (PARTIAL_SUCCESS).
    ``owners``: each record's destination index (-1: every destination). ``whole``: a request
    with no records (remove-all) applies (1) or not (0)."""
    status, reason = sandbox.take_processing(method)
    records = len(owners)
    failing = owners if status == "FAILED" else owners[-1:] if status == "PARTIAL_SUCCESS" else []
    with sandbox.lock:
        sandbox.dm_requests[rid] = SandboxRequest(
            destinations=list(destinations), kind=kind, status=status, reason=reason,
            records=[sum(1 for o in owners if o in (i, -1)) for i in range(len(destinations))],
            failed=[sum(1 for o in failing if o in (i, -1)) for i in range(len(destinations))],
            polls_left=sandbox.status_polls,
        )  # fmt: skip
    if status == "SUCCESS":
        return 1 if whole else records
    if status == "FAILED":
        return 0
    return 1 if whole else max(records - 1, 0)


def _owner(destinations: Any, event: Any) -> int:
    """The index of the destination an event names first (its conversion action)."""
    references = [d.reference for d in destinations]
    named = [r for r in event.destination_references if r in references]
    return references.index(named[0]) if named else 0


def _retrieve_status(sandbox: GoogleSandbox) -> Callable[[Any, grpc.ServicerContext], Any]:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        rid = _preamble(sandbox, "RetrieveRequestStatus", request, context)
        if not request.request_id:
            _abort(
                context,
                _C.INVALID_ARGUMENT,
                "REQUIRED_FIELD_MISSING",
                rid,
                [("REQUIRED_FIELD_MISSING", "request_id")],
            )
        with sandbox.lock:
            taken = sandbox.dm_requests.get(request.request_id)
            if taken is not None and taken.polls_left > 0:
                taken.polls_left -= 1
                processing = True
            else:
                processing = False
        if taken is None:
            _abort(context, _C.NOT_FOUND, None, rid)
        assert taken is not None
        per = dm.RequestStatusPerDestination
        statuses = []
        for destination, records, failed in zip(taken.destinations, taken.records, taken.failed, strict=True):
            # a destination none of whose records failed processed fine (PARTIAL_SUCCESS is
            # the request's status where some did); a failed request failed everywhere
            final = taken.status if failed or taken.status == "FAILED" else "SUCCESS"
            item = per(
                destination=destination,
                request_status=per.RequestStatus.PROCESSING
                if processing
                else getattr(per.RequestStatus, final),
            )
            if not processing and failed and taken.reason:
                reason = getattr(dm.ProcessingErrorReason, taken.reason)
                item.error_info = dm.ErrorInfo(
                    error_counts=[dm.ErrorCount(record_count=failed, reason=reason)]
                )
            if taken.kind == "events":
                item.events_ingestion_status = per.IngestEventsStatus(record_count=records)
            elif taken.kind == "add":
                item.audience_members_ingestion_status = per.IngestAudienceMembersStatus(
                    user_data_ingestion_status=per.IngestUserDataStatus(record_count=records)
                )
            elif taken.kind == "remove":
                item.audience_members_removal_status = per.RemoveAudienceMembersStatus(
                    user_data_removal_status=per.RemoveUserDataStatus(record_count=records)
                )
            else:
                item.remove_all_audience_members_status = per.RemoveAllAudienceMembersStatus()
            statuses.append(item)
        return dm.RetrieveRequestStatusResponse(request_status_per_destination=statuses)

    return handle


def datamanager_handlers(sandbox: GoogleSandbox) -> list[grpc.GenericRpcHandler]:
    """The generic gRPC handler of the Data Manager ingestion service."""

    def unary(fn: Any, request: Any, response: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=request.deserialize, response_serializer=response.serialize
        )

    return [
        grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "IngestEvents": unary(
                    _ingest_events(sandbox), dm.IngestEventsRequest, dm.IngestEventsResponse
                ),
                "IngestAudienceMembers": unary(
                    _members(sandbox, "IngestAudienceMembers", add=True),
                    dm.IngestAudienceMembersRequest,
                    dm.IngestAudienceMembersResponse,
                ),
                "RemoveAudienceMembers": unary(
                    _members(sandbox, "RemoveAudienceMembers", add=False),
                    dm.RemoveAudienceMembersRequest,
                    dm.RemoveAudienceMembersResponse,
                ),
                "RemoveAllAudienceMembers": unary(
                    _remove_all(sandbox),
                    dm.RemoveAllAudienceMembersRequest,
                    dm.RemoveAllAudienceMembersResponse,
                ),
                "RetrieveRequestStatus": unary(
                    _retrieve_status(sandbox),
                    dm.RetrieveRequestStatusRequest,
                    dm.RetrieveRequestStatusResponse,
                ),
            },
        )
    ]
