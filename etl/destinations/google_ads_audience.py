"""Google Ads API Customer Match (``OfflineUserDataJobService``): the suppression-list mirror.

Contract: issue #3 (item 3), ``docs/google.md``; rules from ``shared/reference/ad-platforms.md``
A2: creates and removes never share a job (``CONFLICTING_OPERATION``), ``remove_all`` must be the
first operation of its job (``INVALID_OPERATION_ORDER``), at most 20 identifiers per ``UserData``
and about 10,000 identifiers per ``AddOfflineUserDataJobOperations`` call, consent set on the
job (create jobs only), then run and poll ``offline_user_data_job.status`` with GAQL.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from google.ads.googleads.v26.common.types import consent as consent_types
from google.ads.googleads.v26.common.types import offline_user_data as oud
from google.ads.googleads.v26.enums.types.consent_status import ConsentStatusEnum
from google.ads.googleads.v26.enums.types.offline_user_data_job_type import (
    OfflineUserDataJobTypeEnum,
)
from google.ads.googleads.v26.resources.types.offline_user_data_job import OfflineUserDataJob
from google.ads.googleads.v26.services.types import offline_user_data_job_service as ouds

from etl.destinations.base import Outcome, RowResult
from etl.destinations.google_ads import API_VERSION, classify_ads_error, partial_failures
from etl.destinations.google_common import (
    ADS_IDENTIFIERS_PER_ADD_CALL,
    CONFIG_CODES,
    MAX_ADS_IDENTIFIERS_PER_USER_DATA,
    CallFailed,
    CallFailure,
    GoogleAudienceResult,
    Kind,
    RetryPolicy,
    call_with_retry,
    check_member_row,
    member_key,
    raise_stop,
    results_for_failure,
)
from etl.destinations.google_setup import quiet_sdk_loggers
from etl.errors import DestinationConfigError

log = logging.getLogger("etl.destinations.google")
_GRANTED = ConsentStatusEnum.ConsentStatus.GRANTED
_API = "Ads API"


def _user_data(row: Mapping[str, Any]) -> Any:
    data = oud.UserData()
    for ident in row["user_identifiers"]:
        ((kind, value),) = ident.items()
        if kind == "address_info":
            data.user_identifiers.append(oud.UserIdentifier(address_info=oud.OfflineUserAddressInfo(**value)))
        else:
            data.user_identifiers.append(oud.UserIdentifier(**{kind: value}))
    return data


class GoogleAdsCustomerMatch:
    """``AudienceDestination`` over ``OfflineUserDataJobService`` (Customer Match)."""

    name = "google_customer_match"
    validates_remotely = True  # validate-only requests carry the members to Google

    def __init__(
        self,
        client: Any,
        customer_id: str,
        user_list: str | None,
        *,
        enabled: bool,
        policy: RetryPolicy,
        consented: bool = True,
        poll_interval: float = 10.0,
        poll_timeout: float = 600.0,
    ) -> None:
        quiet_sdk_loggers()
        self._jobs = client.get_service("OfflineUserDataJobService", version=API_VERSION)
        self._search = client.get_service("GoogleAdsService", version=API_VERSION)
        self._customer_id = customer_id
        self._user_list = user_list
        self._enabled = enabled
        # members all have granted authorization only when the plan required it
        # (rules.suppression_requires_consent); otherwise consent is left unset, never claimed
        self._consented = consented
        self._policy = policy
        self._poll_interval = poll_interval
        self._poll_timeout = poll_timeout

    def sync(
        self,
        adds: Sequence[dict[str, Any]],
        removes: Sequence[dict[str, Any]],
        *,
        full_resync: bool = False,
        validate_only: bool = False,
    ) -> GoogleAudienceResult:
        """Apply a membership delta: a remove job, then a create job (never mixed in one job).

        ``full_resync`` sends one create job whose first operation is ``remove_all``; the
        ``removes`` are then implied (everyone not in ``adds`` leaves the list).

        Raises:
            DestinationConfigError: no list configured, or the account is not set up.
            QuotaExhausted: the daily operations quota is spent.
        """
        result = GoogleAudienceResult()
        if not self._enabled:
            log.info("google_customer_match: disabled (google_ads.suppression_enabled is false)")
            return result
        if self._user_list is None:
            raise DestinationConfigError(
                "google_ads.suppression_user_list is not set for customer "
                f"{self._customer_id}; set it or set google_ads.suppression_enabled: false"
            )
        good_adds = self._screen(adds, result)
        good_removes = self._screen(removes, result)
        if full_resync:
            self._run_job(good_adds, "create", result, remove_all=True, validate_only=validate_only)
            result.removes += len(good_removes)
        else:
            if good_removes:
                self._run_job(good_removes, "remove", result, validate_only=validate_only)
            if good_adds:
                self._run_job(good_adds, "create", result, validate_only=validate_only)
        log.info(
            "google_ads Customer Match: adds %d, removes %d, rejected %d, codes %s",
            result.adds,
            result.removes,
            result.rejected,
            dict(sorted(result.codes.items())),
        )
        return result

    def _screen(self, rows: Sequence[dict[str, Any]], result: GoogleAudienceResult) -> list[dict[str, Any]]:
        good = []
        for row in rows:
            code = check_member_row(row, strict=False, max_ids=MAX_ADS_IDENTIFIERS_PER_USER_DATA)
            if code:
                self._reject(result, member_key(row) if "user_identifiers" in row else "", code, None)
            else:
                good.append(row)
        return good

    @staticmethod
    def _reject(result: GoogleAudienceResult, key: str, code: str, rid: str | None) -> None:
        result.rejected += 1
        result.codes[code] = result.codes.get(code, 0) + 1
        result.rejected_members.append(RowResult(key, Outcome.REJECTED, code, rid))
        result.unapplied.add(key)

    def _call(self, method: str, call: Any) -> Any:
        return call_with_retry(call, classify_ads_error, self._policy, label=f"google_ads {method}")

    def _stop_or_reject(
        self,
        exc: CallFailed,
        method: str,
        rows: Sequence[dict[str, Any]],
        result: GoogleAudienceResult,
    ) -> None:
        for row_result in results_for_failure(
            exc,
            [member_key(r) for r in rows],
            api=_API,
            method=method,
            customer_id=self._customer_id,
        ):
            self._reject(result, row_result.key, row_result.code or "UNKNOWN", row_result.request_id)

    def _run_job(
        self,
        rows: Sequence[dict[str, Any]],
        direction: str,
        result: GoogleAudienceResult,
        *,
        remove_all: bool = False,
        validate_only: bool,
    ) -> None:
        metadata = oud.CustomerMatchUserListMetadata(user_list=self._user_list)
        if direction == "create" and self._consented:
            metadata.consent = consent_types.Consent(ad_user_data=_GRANTED, ad_personalization=_GRANTED)
        job = OfflineUserDataJob(
            type_=OfflineUserDataJobTypeEnum.OfflineUserDataJobType.CUSTOMER_MATCH_USER_LIST,
            customer_match_user_list_metadata=metadata,
        )
        try:
            created = self._call(
                "CreateOfflineUserDataJob",
                lambda: self._jobs.create_offline_user_data_job(customer_id=self._customer_id, job=job),
            )
        except CallFailed as exc:
            self._stop_or_reject(exc, "CreateOfflineUserDataJob", rows, result)
            return
        resource = created.resource_name
        result.request_ids.append(resource)
        applied, removing_all = self._add_operations(
            resource, rows, direction, result, remove_all, validate_only
        )
        if remove_all and not removing_all:
            # the call carrying remove_all failed: running the job would add without replacing
            result.codes["REMOVE_ALL_FAILED"] = 1
            for key in {member_key(row) for row in rows} - result.unapplied:
                self._reject(result, key, "REMOVE_ALL_FAILED", None)
            return
        ran = False  # the job finished with SUCCESS: what it carried is on the list
        if validate_only:
            result.codes["VALIDATE_ONLY"] = result.codes.get("VALIDATE_ONLY", 0) + 1
        elif applied or remove_all:
            status, reason = self._run_and_poll(resource)
            if status == "FAILED":
                for row in applied:
                    self._reject(result, member_key(row), reason or "JOB_FAILED", None)
                return
            if status != "SUCCESS":
                result.codes["JOB_PENDING"] = result.codes.get("JOB_PENDING", 0) + 1
                # still running (or its status unknown): Google may yet fail it, so nothing of it
                # is settled; the next sync sends these members again (a repeated add or remove
                # is harmless), and a revoked person is not left on the list for good
                result.unapplied |= {member_key(row) for row in applied}
                applied = []
            ran = status == "SUCCESS"
        if remove_all and ran:
            # only once the job finished: one still running may yet fail, and a list counted as
            # replaced settles whoever left, so a revoked person would stay on it for good
            result.replaced = True
        if direction == "create":
            result.adds += len(applied)
        else:
            result.removes += len(applied)

    def _add_operations(
        self,
        resource: str,
        rows: Sequence[dict[str, Any]],
        direction: str,
        result: GoogleAudienceResult,
        remove_all: bool,
        validate_only: bool,
    ) -> tuple[list[dict[str, Any]], bool]:
        """Add the operations in calls of about 10,000 identifiers.

        Returns the rows Google took, and whether the ``remove_all`` operation (first of the
        first call) was taken: when it was not, the job must not run.
        """
        calls: list[list[tuple[dict[str, Any] | None, Any]]] = [[]]
        removing_all = False
        size = 0
        if remove_all:
            calls[0].append((None, ouds.OfflineUserDataJobOperation(remove_all=True)))
            size = 1
        for row in rows:
            count = len(row["user_identifiers"])
            if size + count > ADS_IDENTIFIERS_PER_ADD_CALL and calls[-1]:
                calls.append([])
                size = 0
            calls[-1].append((row, ouds.OfflineUserDataJobOperation(**{direction: _user_data(row)})))
            size += count
        applied: list[dict[str, Any]] = []
        for call_ops in calls:
            if not call_ops:
                continue
            request = ouds.AddOfflineUserDataJobOperationsRequest(
                resource_name=resource,
                enable_partial_failure=True,
                operations=[op for _, op in call_ops],
                validate_only=validate_only,
            )
            call_rows = [row for row, _ in call_ops if row is not None]
            try:
                response = self._call(
                    "AddOfflineUserDataJobOperations",
                    lambda request=request: self._jobs.add_offline_user_data_job_operations(request=request),
                )
            except CallFailed as exc:
                self._stop_or_reject(exc, "AddOfflineUserDataJobOperations", call_rows, result)
                if remove_all and not removing_all:
                    return applied, False  # nothing else is sent to a job that will not run
                continue
            by_index, unlocated, rid = partial_failures(response.partial_failure_error)
            stop = next(
                (c for codes in [*by_index.values(), unlocated] for c in codes if c in CONFIG_CODES), None
            )
            if stop:
                raise_stop(
                    CallFailure(Kind.CONFIG, stop, rid),
                    api=_API,
                    method="AddOfflineUserDataJobOperations",
                    customer_id=self._customer_id,
                )
            for index, (member, _) in enumerate(call_ops):
                if member is None:
                    removing_all = index not in by_index and not unlocated
                    continue
                if index in by_index:
                    self._reject(result, member_key(member), by_index[index][0], rid)
                elif unlocated:
                    # an error that names no operation may concern this one: not settled, so the
                    # next sync sends it again (adds and removes are idempotent)
                    code = f"unlocated/{unlocated[0]}"
                    result.codes[code] = result.codes.get(code, 0) + 1
                    result.unapplied.add(member_key(member))
                else:
                    applied.append(member)
            if remove_all and not removing_all:
                return applied, False
        return applied, removing_all

    def _run_and_poll(self, resource: str) -> tuple[str, str | None]:
        try:
            self._call(
                "RunOfflineUserDataJob",
                lambda: self._jobs.run_offline_user_data_job(resource_name=resource),
            )
        except CallFailed as exc:
            raise_stop(
                exc.failure,
                api=_API,
                method="RunOfflineUserDataJob",
                customer_id=self._customer_id,
            )
            return "FAILED", exc.failure.code
        query = (
            "SELECT offline_user_data_job.status, offline_user_data_job.failure_reason "
            "FROM offline_user_data_job "
            f"WHERE offline_user_data_job.resource_name = '{resource}'"
        )
        deadline = time.monotonic() + self._poll_timeout
        status = "PENDING"
        while True:
            try:
                rows = self._call(
                    "Search",
                    lambda: list(self._search.search(customer_id=self._customer_id, query=query)),
                )
            except CallFailed as exc:
                raise_stop(exc.failure, api=_API, method="Search", customer_id=self._customer_id)
                log.warning("google_ads Customer Match job status unknown (%s)", exc.failure.code)
                return "UNKNOWN", None
            if rows:
                job = rows[0].offline_user_data_job
                status = job.status.name
                if status in ("SUCCESS", "FAILED"):
                    reason = job.failure_reason.name if status == "FAILED" else None
                    return status, reason
            if time.monotonic() + self._poll_interval > deadline:
                log.warning(
                    "google_ads Customer Match job still %s after %.0f s",
                    status,
                    self._poll_timeout,
                )
                return status, None
            time.sleep(self._poll_interval)
