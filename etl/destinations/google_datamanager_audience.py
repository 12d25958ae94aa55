"""Data Manager API Customer Match: the suppression-list mirror through audience members.

Contract: issue #3 (item 3), ``docs/google.md``; limits from ``shared/reference/ad-platforms.md``
A5 (at most 10,000 members and 10 identifiers per member per request). Removes go first, then
adds; ``full_resync`` calls ``RemoveAllAudienceMembers`` before the adds. Requests refused for
one bad member are bisected like events (``google_common.send_bisecting``). Ingest requests
carry request-level consent and the Customer Match terms-of-service acceptance, which the API
requires for user data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from google.ads import datamanager_v1 as dm

from etl.destinations.base import Outcome, RowResult
from etl.destinations.google_common import (
    MAX_DM_IDENTIFIERS,
    MAX_DM_MEMBERS_PER_REQUEST,
    USER_LIST,
    GoogleAudienceResult,
    RetryPolicy,
    check_member_row,
    chunked,
    member_key,
    send_bisecting,
)
from etl.destinations.google_datamanager import (
    TIMEOUT_SECONDS,
    DataManagerBase,
    reject_row,
    user_data,
)
from etl.errors import DestinationConfigError, QuotaExhausted

log = logging.getLogger("etl.destinations.google")


class DataManagerCustomerMatch(DataManagerBase):
    """``AudienceDestination`` over ``IngestAudienceMembers`` / ``RemoveAudienceMembers``."""

    name = "google_customer_match"
    validates_remotely = True  # validate-only requests carry the members to Google

    def __init__(
        self,
        client: dm.IngestionServiceClient,
        customer_id: str,
        login_customer_id: str | None,
        policy: RetryPolicy,
        *,
        user_list: str | None,
        enabled: bool,
        consented: bool = True,
    ) -> None:
        super().__init__(client, customer_id, login_customer_id, policy)
        self._user_list = user_list
        self._enabled = enabled
        # GRANTED only when the plan required granted authorization for every member
        # (rules.suppression_requires_consent); otherwise the request leaves consent unset
        self._consented = consented

    def sync(
        self,
        adds: Sequence[dict[str, Any]],
        removes: Sequence[dict[str, Any]],
        *,
        full_resync: bool = False,
        validate_only: bool = False,
    ) -> GoogleAudienceResult:
        """Remove, then add, in requests of at most 10,000 members (bisected when refused).

        ``full_resync`` first calls ``RemoveAllAudienceMembers`` and then adds; ``removes`` are
        then implied. Raises ``DestinationConfigError`` / ``QuotaExhausted`` like ``send``.
        """
        result = GoogleAudienceResult()
        if not self._enabled:
            log.info("google_customer_match: disabled (google_ads.suppression_enabled is false)")
            return result
        match = USER_LIST.match(self._user_list or "")
        if match is None:
            raise DestinationConfigError(
                "google_ads.suppression_user_list is not set for customer "
                f"{self._customer_id}; set it or set google_ads.suppression_enabled: false"
            )
        destination = self._destination(match.group(2))
        good_adds = self._screen(adds, result)
        good_removes = self._screen(removes, result)
        if full_resync:
            request = dm.RemoveAllAudienceMembersRequest(
                destinations=[destination], validate_only=validate_only
            )
            response, failed = self._request(
                "RemoveAllAudienceMembers",
                lambda: self._client.remove_all_audience_members(
                    request=request, retry=None, timeout=TIMEOUT_SECONDS
                ),
                ["remove_all"],
                bisect=False,  # nothing to split: a refusal is this sync's answer
            )
            if failed:
                result.codes[failed[0].code or "UNKNOWN"] = 1
                return result
            result.codes["REMOVE_ALL"] = 1
            if response.request_id and not validate_only:
                result.request_ids.append(response.request_id)
                result.checks[response.request_id] = ("RemoveAllAudienceMembers", 0)
            result.removes += len(good_removes)
            result.replaced = not validate_only
        else:
            self._send_members(good_removes, destination, result, add=False, validate_only=validate_only)
        try:
            self._send_members(good_adds, destination, result, add=True, validate_only=validate_only)
        except (DestinationConfigError, QuotaExhausted) as stop:
            if result.replaced:
                # the list is already empty: the stop carries that, with every add unapplied,
                # so the state is not left claiming members Google no longer holds
                result.unapplied |= {member_key(row) for row in good_adds}
                stop.partial_audience = result
            raise
        log.info(
            "datamanager Customer Match: adds %d, removes %d, rejected %d, codes %s",
            result.adds,
            result.removes,
            result.rejected,
            dict(sorted(result.codes.items())),
        )
        return result

    def _screen(self, rows: Sequence[dict[str, Any]], result: GoogleAudienceResult) -> list[dict[str, Any]]:
        good = []
        for row in rows:
            code = check_member_row(row, strict=True, max_ids=MAX_DM_IDENTIFIERS)
            if code:
                key = member_key(row) if isinstance(row, Mapping) and "user_identifiers" in row else ""
                _record(result, RowResult(key, Outcome.REJECTED, code))
            else:
                good.append(row)
        return good

    def _send_members(
        self,
        rows: Sequence[dict[str, Any]],
        destination: dm.Destination,
        result: GoogleAudienceResult,
        *,
        add: bool,
        validate_only: bool,
    ) -> None:
        method = "IngestAudienceMembers" if add else "RemoveAudienceMembers"

        def send_once(part: Sequence[dict[str, Any]]) -> list[RowResult]:
            members = [dm.AudienceMember(user_data=user_data(r["user_identifiers"])) for r in part]
            consent = dm.Consent(
                ad_user_data=dm.ConsentStatus.CONSENT_GRANTED,
                ad_personalization=dm.ConsentStatus.CONSENT_GRANTED,
            )
            terms = dm.TermsOfService(customer_match_terms_of_service_status=dm.TermsOfServiceStatus.ACCEPTED)
            common = {
                "destinations": [destination],
                "audience_members": members,
                "encoding": dm.Encoding.HEX,
                "validate_only": validate_only,
            }
            if add:
                claimed = {"consent": consent} if self._consented else {}
                ingest = dm.IngestAudienceMembersRequest(**common, **claimed, terms_of_service=terms)
                call: Callable[[], Any] = partial(
                    self._client.ingest_audience_members,
                    request=ingest,
                    retry=None,
                    timeout=TIMEOUT_SECONDS,
                )
            else:
                remove = dm.RemoveAudienceMembersRequest(**common)
                call = partial(
                    self._client.remove_audience_members,
                    request=remove,
                    retry=None,
                    timeout=TIMEOUT_SECONDS,
                )
            keys = [member_key(r) for r in part]
            response, failed = self._request(method, call, keys)
            if failed is not None:
                return failed
            return [RowResult(k, Outcome.ACCEPTED, None, response.request_id or None) for k in keys]

        for chunk in chunked(rows, MAX_DM_MEMBERS_PER_REQUEST):
            for row_result in send_bisecting(chunk, send_once, lambda r, f: reject_row(member_key(r), f)):
                if row_result.outcome is Outcome.ACCEPTED:
                    if add:
                        result.adds += 1
                    else:
                        result.removes += 1
                    if row_result.request_id and row_result.request_id not in result.request_ids:
                        result.request_ids.append(row_result.request_id)
                    if row_result.request_id and not validate_only:
                        _, members = result.checks.get(row_result.request_id, (method, 0))
                        result.checks[row_result.request_id] = (method, members + 1)
                else:
                    _record(result, row_result)


def _record(result: GoogleAudienceResult, row_result: RowResult) -> None:
    code = row_result.code or "UNKNOWN"
    result.rejected += 1
    result.codes[code] = result.codes.get(code, 0) + 1
    result.rejected_members.append(RowResult(row_result.key, Outcome.REJECTED, code, row_result.request_id))
    result.unapplied.add(row_result.key)
