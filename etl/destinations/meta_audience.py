"""Meta Custom Audience sync (suppression lists) through facebook-business.

Why: SPEC rule 12 mirrors each clinic's existing-patient list to Meta; issue #4 and
``shared/reference/ad-platforms.md`` B3/B4 fix how: ``/{audience_id}/users`` with the multi-key
schema pre-hashed, at most 10,000 rows per call, session fields for multi-batch uploads,
``usersreplace`` for a full resync, and Meta's 2025 health-audience flags. ``docs/meta.md``
records the decisions (removal in the request body, session ids, what a failure does).

Rows are the ``meta_audience.jsonl`` lines of SPEC section 5 (already hashed and gated); members
are identified by ``member_key`` (``etl.destinations.meta``).
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from facebook_business.adobjects.customaudience import CustomAudience

from etl.config import ClinicConfig
from etl.destinations.base import AudienceResult
from etl.destinations.meta import (
    HEALTH_FLAG_MESSAGE,
    GraphCallError,
    GraphFailure,
    MetaDestinationConfigError,
    MetaGraphClient,
    MetaUnavailable,
    describe_failure,
    member_key,
)
from etl.errors import ConfigError

log = logging.getLogger(__name__)

MAX_ROWS_PER_CALL = 10_000
SCHEMA_KEYS = frozenset({"EMAIL", "PHONE", "FN", "LN", "ZIP", "CT", "ST", "COUNTRY"})
HEALTH_FLAG_STATUS = 471
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

Schema = tuple[str, ...]


class MetaAudience:
    """``AudienceDestination`` for one clinic's suppression Custom Audience.

    Args:
        now: the run's end; with the clinic id and a random nonce it seeds the upload
            ``session_id``s when no ``session_seed`` is given, so a rerun (an Airflow retry)
            never reopens a session an earlier attempt finished.
        session_seed: caller-chosen seed for ``session_id`` (e.g. the run id).
        max_rows: rows per ``/users`` call (Meta allows 10,000).
    """

    name = "meta_audience"
    validates_remotely = False  # its validate-only checks are local: nothing leaves

    def __init__(
        self,
        config: ClinicConfig,
        client: MetaGraphClient,
        *,
        now: datetime,
        session_seed: str | None = None,
        max_rows: int = MAX_ROWS_PER_CALL,
    ) -> None:
        if config.meta is None:
            raise ConfigError(f"{config.clinic_id}: the clinic config has no 'meta' section")
        self._client = client
        self._enabled = config.meta.suppression_enabled
        self._audience_id = config.meta.suppression_audience_id
        self._target = f"audience {self._audience_id}"
        # session_id must be unique per ad account: a retried sync (an Airflow retry of the same
        # run) must not reopen a session an earlier attempt finished, hence the nonce
        self._seed = session_seed or f"{config.clinic_id}:{now.isoformat()}:{secrets.token_hex(8)}"
        self._max_rows = max(1, min(max_rows, MAX_ROWS_PER_CALL))
        self._sessions = 0

    @property
    def client(self) -> MetaGraphClient:
        return self._client

    def sync(
        self,
        adds: Sequence[dict[str, Any]],
        removes: Sequence[dict[str, Any]],
        *,
        full_resync: bool = False,
        validate_only: bool = False,
    ) -> AudienceResult:
        """Apply a delta (removes, then adds) or, with ``full_resync``, replace the membership.

        ``validate_only`` checks rows locally and reports ``would_add`` / ``would_remove`` in
        ``codes`` without a network call. Rows failing the checks count as ``rejected`` under
        code ``invalid_format``; entries Meta reports invalid count under ``invalid_entries``.

        Raises:
            DestinationConfigError: token, permission, unknown audience, or the audience is
                flagged as suggesting a health condition (status 471 / subcode 1713230).
            MetaUnavailable: still throttled or failing after back-off; nothing is lost, the
                next run's sync recomputes the delta (adds and removes are idempotent).
        """
        result = AudienceResult()
        if not self._enabled:
            log.info("meta_audience: suppression disabled for this clinic; nothing sent")
            return result
        to_add = self._collect(adds, "add", result)
        to_remove = {} if full_resync else self._collect(removes, "remove", result)
        if not any(to_add.values()) and not any(to_remove.values()):
            if full_resync:
                # usersreplace cannot empty an audience; Meta needs at least one row
                result.codes["empty_resync_skipped"] = 1
            return result
        if self._audience_id is None:
            raise MetaDestinationConfigError(
                "meta.suppression_audience_id is not set but suppression is enabled: create a "
                "customer-list Custom Audience (customer_file_source USER_PROVIDED_ONLY) and put "
                "its id in the clinic config, or set meta.suppression_enabled: false."
            )
        if validate_only:
            result.codes["would_add"] = sum(len(m) for m in to_add.values())
            result.codes["would_remove"] = sum(len(m) for m in to_remove.values())
            return result
        self._check_status(result)
        if full_resync:
            if len([m for m in to_add.values() if m]) > 1:
                # each usersreplace session swaps the whole membership: only the last would stay
                raise ValueError("a full resync sends one schema; the plan's rows carry several")
            # Meta replaces the audience once the replace session completed
            result.replaced = all(
                self._upload("replace", schema, list(members.values()), result)
                for schema, members in to_add.items()
            )
        else:
            for schema, members in to_remove.items():
                self._upload("remove", schema, list(members.values()), result)
            for schema, members in to_add.items():
                self._upload("add", schema, list(members.values()), result)
        log.info(
            "meta_audience: %s: %d added, %d removed, %d rejected in %d requests",
            self._target,
            result.adds,
            result.removes,
            result.rejected,
            len(result.request_ids),
        )
        return result

    def _collect(
        self, rows: Sequence[Mapping[str, Any]], operation: str, result: AudienceResult
    ) -> dict[Schema, dict[str, list[str]]]:
        """Group valid member rows by schema, deduplicated by member key."""
        groups: dict[Schema, dict[str, list[str]]] = {}
        for row in rows:
            if not isinstance(row, Mapping):
                _count(result, "invalid_format", 1)
                continue
            data = row.get("data")
            if isinstance(data, list):  # whatever is refused below is not applied
                result.unapplied.update(_key_of(m) for m in data)
            schema, data = row.get("schema"), row.get("data")
            if (
                row.get("operation") != operation
                or not isinstance(schema, list)
                or not schema
                or len(set(schema)) != len(schema)
                or not all(key in SCHEMA_KEYS for key in schema)
                or not isinstance(data, list)
            ):
                bad = len(data) if isinstance(data, list) else 1
                _count(result, "invalid_format", bad)
                continue
            members = groups.setdefault(tuple(schema), {})
            for member in data:
                if _valid_member(member, len(schema)):
                    key = member_key(member)
                    members[key] = list(member)
                    result.unapplied.discard(key)
                else:
                    _count(result, "invalid_format", 1)
        return groups

    def _check_status(self, result: AudienceResult) -> None:
        """Read ``operation_status`` first: a health-flagged audience refuses every edit."""
        failure: GraphFailure | None = None
        try:
            body, trace = self._client.request(
                "GET", (str(self._audience_id),), {"fields": "operation_status"}
            )
        except GraphCallError as exc:
            failure = exc.failure
        if failure is not None:  # outside the except block: see ``_upload``
            self._raise_for(failure)
            log.warning("meta_audience: could not read %s status (%s)", self._target, failure.label)
            return
        if trace:
            result.request_ids.append(trace)
        status = body.get("operation_status")
        code = status.get("code") if isinstance(status, Mapping) else None
        if code == HEALTH_FLAG_STATUS:
            raise MetaDestinationConfigError(HEALTH_FLAG_MESSAGE.format(target=self._target))

    def _upload(self, kind: str, schema: Schema, members: list[list[str]], result: AudienceResult) -> bool:
        """One upload session: batches of ``max_rows`` with ``batch_seq`` 1..n; False if it stopped."""
        batches = [members[i : i + self._max_rows] for i in range(0, len(members), self._max_rows)]
        session_id = self._session_id(kind, schema)
        for seq, batch in enumerate(batches, start=1):
            session = {
                "session_id": session_id,
                "batch_seq": seq,
                "last_batch_flag": seq == len(batches),
                "estimated_num_total": len(members),
            }
            params = CustomAudience.format_params(
                list(schema), batch, is_raw=True, pre_hashed=True, session=session
            )
            method, edge = {
                "add": ("POST", "users"),
                "remove": ("DELETE", "users"),
                "replace": ("POST", "usersreplace"),
            }[kind]
            failure: GraphFailure | None = None
            try:
                body, trace = self._client.request(
                    method,
                    (str(self._audience_id), edge),
                    params,
                    params_in_body=kind == "remove",
                )
            except GraphCallError as exc:
                failure = exc.failure
            if failure is not None:
                # outside the except block, so nothing we raise carries the SDK error (whose
                # text holds the request's params: the batch's hashes) as its context
                self._raise_for(failure)
                if failure.fbtrace_id:
                    result.request_ids.append(failure.fbtrace_id)
                left = sum(len(b) for b in batches[seq - 1 :])
                # a session with a missing batch cannot be continued: stop it here
                log.warning(
                    "meta_audience: %s %s session stopped at batch %d of %d (code %s); %d rows not applied",
                    self._target,
                    kind,
                    seq,
                    len(batches),
                    failure.label,
                    left,
                )
                _count(result, failure.label, left)
                result.unapplied.update(member_key(m) for b in batches[seq - 1 :] for m in b)
                return False
            if trace:
                result.request_ids.append(trace)
            received = _as_count(body.get("num_received"), len(batch))
            invalid = _as_count(body.get("num_invalid_entries"), 0)
            if invalid:
                _count(result, "invalid_entries", invalid)
            if kind == "remove":
                result.removes += received - invalid
            else:
                result.adds += received - invalid
        return True

    def _raise_for(self, failure: GraphFailure) -> None:
        if failure.stops_run:
            raise MetaDestinationConfigError(describe_failure(failure, self._target)) from None
        if failure.throttled or failure.transient:
            raise MetaUnavailable(
                f"Meta kept refusing {self._target} (code {failure.label}"
                + (f", fbtrace_id {failure.fbtrace_id}" if failure.fbtrace_id else "")
                + ") after back-off; the next run re-syncs what was not applied."
            ) from None

    def _session_id(self, kind: str, schema: Schema) -> int:
        """A positive int64 derived from the seed, audience, operation and call order."""
        self._sessions += 1
        material = f"{self._seed}|{self._audience_id}|{kind}|{','.join(schema)}|{self._sessions}"
        return int(hashlib.sha256(material.encode("utf-8")).hexdigest()[:15], 16) + 1


def _valid_member(member: Any, width: int) -> bool:
    if not isinstance(member, list) or len(member) != width:
        return False
    if not all(isinstance(v, str) and (v == "" or _HEX64.match(v)) for v in member):
        return False
    return any(member)


def _key_of(member: Any) -> str:
    """A refused row's member key when it has one (a list of text), else "" (never recorded)."""
    if isinstance(member, list) and all(isinstance(v, str) for v in member):
        return member_key(member)
    return ""


def _count(result: AudienceResult, code: str, n: int) -> None:
    result.rejected += n
    result.codes[code] = result.codes.get(code, 0) + n


def _as_count(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default
