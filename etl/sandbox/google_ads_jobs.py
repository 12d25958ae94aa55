"""The Customer Match half of the Google Ads sandbox: offline user data jobs and their status.

Contract: ``shared/reference/ad-platforms.md`` A2: a job takes creates or removes, never both
(``CONFLICTING_OPERATION``); ``remove_all`` only as the job's first operation
(``INVALID_OPERATION_ORDER``); at most 20 identifiers per ``UserData`` and 100,000 per call;
operation-level consent refused (``OPERATION_LEVEL_CONSENT_PROVIDED``); nothing added after
the run (``JOB_ALREADY_STARTED``). A run job answers RUNNING to ``GoogleAdsService.Search`` for
``GoogleSandbox.job_polls`` polls, then SUCCESS; membership changes apply at run time.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.ads.googleads.v26.resources.types.offline_user_data_job import OfflineUserDataJob
from google.ads.googleads.v26.services.types import google_ads_service as gas
from google.ads.googleads.v26.services.types import offline_user_data_job_service as ouds
from google.longrunning import operations_pb2

from etl.destinations.google_common import HEX64, USER_LIST
from etl.sandbox.google import SandboxJob, identifiers_key
from etl.sandbox.google_ads_api import PREFIX, AdsCall, Err, abort, partial_status, unary

if TYPE_CHECKING:
    from etl.sandbox.google import GoogleSandbox


def _member_identifiers(user_data: Any) -> tuple[list[dict[str, Any]], str | None]:
    """Outbox-row form of a UserData's identifiers, or the OfflineUserDataJobError name."""
    rows: list[dict[str, Any]] = []
    if not user_data.user_identifiers:
        return rows, "MISSING_USER_IDENTIFIER"
    if len(user_data.user_identifiers) > 20:
        return rows, "TOO_MANY_USER_IDENTIFIERS"
    for ident in user_data.user_identifiers:
        kind = type(ident).pb(ident).WhichOneof("identifier")
        if kind in ("hashed_email", "hashed_phone_number"):
            if not HEX64.match(getattr(ident, kind)):
                return rows, "INVALID_SHA256_FORMAT"
            rows.append({kind: getattr(ident, kind)})
        elif kind == "address_info":
            a = ident.address_info
            if not (HEX64.match(a.hashed_first_name) and HEX64.match(a.hashed_last_name)):
                return rows, "INVALID_SHA256_FORMAT"
            if not re.match(r"^[A-Z]{2}$", a.country_code) or not a.postal_code:
                return rows, "INVALID_COUNTRY_CODE"
            rows.append(
                {
                    "address_info": {
                        "hashed_first_name": a.hashed_first_name,
                        "hashed_last_name": a.hashed_last_name,
                        "country_code": a.country_code,
                        "postal_code": a.postal_code,
                    }
                }
            )
        else:
            return rows, "INCOMPATIBLE_USER_IDENTIFIER"
    return rows, None


def _job_error(name: str, index: int | None = None) -> Err:
    path: list[tuple[str, int | None]] = [("operations", index)] if index is not None else []
    return "offline_user_data_job_error", name, path


def _create_job(sandbox: GoogleSandbox) -> Callable[[Any, grpc.ServicerContext], Any]:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        call = AdsCall(sandbox, "CreateOfflineUserDataJob", request, context)
        job = request.job
        metadata = job.customer_match_user_list_metadata
        if job.type_.name != "CUSTOMER_MATCH_USER_LIST":
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                [_job_error("INVALID_USER_LIST_TYPE")],
                call.rid,
            )
        match = USER_LIST.match(metadata.user_list)
        if match is None or match.group(1) != request.customer_id:
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                [_job_error("INVALID_USER_LIST_ID")],
                call.rid,
            )
        consent = (metadata.consent.ad_user_data.name, metadata.consent.ad_personalization.name)
        if "DENIED" in consent:
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                [_job_error("CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS")],
                call.rid,
            )
        resource = f"customers/{request.customer_id}/offlineUserDataJobs/{sandbox.next_id()}"
        if not request.validate_only:
            with sandbox.lock:
                sandbox.jobs[resource] = SandboxJob(resource, metadata.user_list, consent[0] == "GRANTED")
        return ouds.CreateOfflineUserDataJobResponse(resource_name=resource)

    return handle


def _add_operations(sandbox: GoogleSandbox) -> Callable[[Any, grpc.ServicerContext], Any]:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        call = AdsCall(sandbox, "AddOfflineUserDataJobOperations", request, context)
        with sandbox.lock:
            job = sandbox.jobs.get(request.resource_name)
            if job is None:
                abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    [("request_error", "RESOURCE_NOT_FOUND", [])],
                    call.rid,
                )
                raise AssertionError  # unreachable: abort raises
            if job.status != "PENDING":
                abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    [_job_error("JOB_ALREADY_STARTED")],
                    call.rid,
                )
            total = 0
            for op in request.operations:
                which = type(op).pb(op).WhichOneof("operation")
                total += len(getattr(op, which).user_identifiers) if which in ("create", "remove") else 1
            if total > 100_000:
                abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    [("collection_size_error", "TOO_MANY", [("operations", None)])],
                    call.rid,
                )
            errors: list[Err] = []
            direction, remove_all, ops = job.direction, job.remove_all, list(job.operations)
            for i, op in enumerate(request.operations):
                which = type(op).pb(op).WhichOneof("operation")
                if which == "remove_all":
                    if ops or i > 0 or remove_all or job.direction:
                        errors.append(_job_error("INVALID_OPERATION_ORDER", i))
                    else:
                        remove_all = True
                    continue
                if direction is not None and which != direction:
                    errors.append(_job_error("CONFLICTING_OPERATION", i))
                    continue
                user_data = getattr(op, which)
                if user_data.consent.ad_user_data.name != "UNSPECIFIED":
                    errors.append(_job_error("OPERATION_LEVEL_CONSENT_PROVIDED", i))
                    continue
                identifiers, problem = _member_identifiers(user_data)
                if problem:
                    errors.append(_job_error(problem, i))
                    continue
                direction = which
                ops.append((which, identifiers_key(identifiers)))
            if sandbox.take_unlocated_error():  # the operations still go into the job
                errors.append(("internal_error", "INTERNAL_ERROR", []))
            if errors and not request.enable_partial_failure:
                abort(context, grpc.StatusCode.INVALID_ARGUMENT, errors, call.rid)
            if not request.validate_only:
                job.direction, job.remove_all, job.operations = direction, remove_all, ops
        return ouds.AddOfflineUserDataJobOperationsResponse(
            partial_failure_error=partial_status(errors, call.rid)
        )

    return handle


def _run_job(sandbox: GoogleSandbox) -> Callable[[Any, grpc.ServicerContext], Any]:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        call = AdsCall(sandbox, "RunOfflineUserDataJob", request, context)
        with sandbox.lock:
            job = sandbox.jobs.get(request.resource_name)
            if job is None or job.status != "PENDING":
                name = "JOB_ALREADY_STARTED" if job is not None else "UNKNOWN"
                abort(context, grpc.StatusCode.INVALID_ARGUMENT, [_job_error(name)], call.rid)
                raise AssertionError  # unreachable: abort raises
            job.status = "RUNNING"
            job.polls_left = sandbox.job_polls
            sandbox.apply_members(job.user_list, job.operations, clear=job.remove_all)
        customer = request.resource_name.split("/")[1]
        return operations_pb2.Operation(
            name=f"customers/{customer}/operations/{sandbox.next_id()}", done=False
        )

    return handle


def _search(sandbox: GoogleSandbox) -> Callable[[Any, grpc.ServicerContext], Any]:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        AdsCall(sandbox, "Search", request, context)
        match = re.search(r"offline_user_data_job\.resource_name\s*=\s*'([^']+)'", request.query)
        rows = []
        with sandbox.lock:
            job = sandbox.jobs.get(match.group(1)) if match else None
            if job is not None:
                if job.status == "RUNNING":
                    if job.polls_left <= 0:
                        job.status = "SUCCESS"
                    job.polls_left -= 1
                state = OfflineUserDataJob(resource_name=job.resource_name, status=job.status)
                rows.append(gas.GoogleAdsRow(offline_user_data_job=state))
        return gas.SearchGoogleAdsResponse(results=rows)

    return handle


def job_handlers(sandbox: GoogleSandbox) -> list[grpc.GenericRpcHandler]:
    """Generic gRPC handlers of ``OfflineUserDataJobService`` and ``GoogleAdsService.Search``."""
    return [
        grpc.method_handlers_generic_handler(
            PREFIX + "OfflineUserDataJobService",
            {
                "CreateOfflineUserDataJob": unary(
                    _create_job(sandbox),
                    ouds.CreateOfflineUserDataJobRequest,
                    ouds.CreateOfflineUserDataJobResponse.serialize,
                ),
                "AddOfflineUserDataJobOperations": unary(
                    _add_operations(sandbox),
                    ouds.AddOfflineUserDataJobOperationsRequest,
                    ouds.AddOfflineUserDataJobOperationsResponse.serialize,
                ),
                "RunOfflineUserDataJob": unary(
                    _run_job(sandbox),
                    ouds.RunOfflineUserDataJobRequest,
                    operations_pb2.Operation.SerializeToString,
                ),
            },
        ),
        grpc.method_handlers_generic_handler(
            PREFIX + "GoogleAdsService",
            {
                "Search": unary(
                    _search(sandbox),
                    gas.SearchGoogleAdsRequest,
                    gas.SearchGoogleAdsResponse.serialize,
                ),
            },
        ),
    ]
