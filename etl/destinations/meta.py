"""Meta adapters: Conversions API events through facebook-business (the Graph client is shared).

Why: SPEC section 5 sends ``meta_events.jsonl`` rows to Meta with the official SDK and records
one outcome per row; issue #4 and ``shared/reference/ad-platforms.md`` section B fix the
contract (batches of at most 1,000, one bad event rejects the whole request, error codes and
throttling), ``docs/architecture.md`` ("Destinations") the interface, and ``docs/meta.md`` the
decisions taken here. ``MetaAudience`` lives in ``etl.destinations.meta_audience``, the shared
Graph client and its error model in ``etl.destinations.meta_graph`` (re-exported here), and the
per-row checks in ``etl.destinations.meta_rows``.

Rows arrive already normalized, hashed and through the PHI gate, so the SDK only ever sees
64-hex hashes (which it passes through unhashed), opaque ids and click ids. Still, nothing here
logs a URL, a body or ``str(FacebookRequestError)`` (which embeds the request parameters), and
every exception we raise is built from code, subcode, object id and ``fbtrace_id`` only. The
access token travels in an ``Authorization`` header rather than the SDK's default query string,
so it is not in any URL that urllib3 logs at DEBUG or a proxy writes to its access log.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from facebook_business.adobjects.serverside.event import Event
from facebook_business.adobjects.serverside.event_request import EventRequest

from etl.config import ClinicConfig
from etl.destinations.base import (
    AudienceDestination,
    ConversionDestination,
    Outcome,
    RowResult,
)
from etl.destinations.meta_graph import (
    ACCESS_TOKEN_ENV,
    APP_ID_ENV,
    APP_SECRET_ENV,
    AUTH_CODES,
    HALT_CODES,
    HEALTH_FLAG_MESSAGE,
    PERMISSION_CODES,
    SANDBOX_TOKEN_ENV,
    SANDBOX_URL_ENV,
    SUBCODE_AUDIENCE_BLOCKED,
    SUBCODE_UNKNOWN_OBJECT,
    THROTTLE_CODES,
    TRANSIENT_CODES,
    GraphCallError,
    GraphFailure,
    MetaDestinationConfigError,
    MetaGraphClient,
    MetaUnavailable,
    describe_failure,
)
from etl.destinations.meta_rows import build_event, precheck_event
from etl.errors import ConfigError

if TYPE_CHECKING:
    from etl.sandbox.meta import MetaSandbox


# what other modules import from here (the Graph client and its error model live in meta_graph)
__all__ = [
    "ACCESS_TOKEN_ENV", "APP_ID_ENV", "APP_SECRET_ENV", "AUTH_CODES", "HALT_CODES",
    "HEALTH_FLAG_MESSAGE", "PERMISSION_CODES", "SANDBOX_TOKEN_ENV", "SANDBOX_URL_ENV",
    "SUBCODE_AUDIENCE_BLOCKED", "SUBCODE_UNKNOWN_OBJECT", "THROTTLE_CODES", "TRANSIENT_CODES",
    "GraphCallError", "GraphFailure", "MetaDestinationConfigError", "MetaEvents", "MetaGraphClient",
    "MetaUnavailable", "describe_failure", "doctor_meta", "make_meta_destinations", "member_key",
]  # fmt: skip

log = logging.getLogger(__name__)


def member_key(data_row: Sequence[str]) -> str:
    """The stable identity of one audience member row (its hashes in schema order).

    ``sha256(json.dumps(data_row, separators=(",", ":")))`` as lowercase hex; the sandbox keys
    membership the same way, so tests and the pipeline's sync state can compare members.
    """
    from etl.payloads import meta_member_key

    return meta_member_key(list(data_row))


# Code-100 subcodes known to describe one event, so a single event refused with one is rejected
# for good: 2804003 (event too old; RudderStack's mapping) and the sandbox's own invalid and
# future event. A single event refused with any other subcode is deferred (sent again next
# run, until our own age check drops it): an unknown subcode may be a request-level problem
# (a Test Events code no longer valid, a dataset setting) that would otherwise turn every event
# into a final rejection, one bisected batch a night.
EVENT_SUBCODES = frozenset({2804003, 9000001, 9000004})


class MetaEvents:
    """``ConversionDestination`` for the Conversions API: ``POST /{pixel_id}/events``.

    Every row is checked (age against ``now`` and ``meta.event_age_limit_days``, format) before
    batching, because one bad event makes Meta reject the whole request; a request Meta still
    rejects with code 100 is bisected until the bad events are isolated.

    Args:
        now: the run's end (tz-aware); event age is judged against it, never the clock.
        test_event_code: routes events to Events Manager's Test Events (still sent to Meta).
        bisect_budget: most requests one ``send`` may spend; rows left undecided are deferred.
    """

    name = "meta_events"
    max_batch = 1000

    def __init__(
        self,
        config: ClinicConfig,
        client: MetaGraphClient,
        *,
        now: datetime,
        test_event_code: str | None = None,
        bisect_budget: int = 200,
    ) -> None:
        if config.meta is None:
            raise ConfigError(f"{config.clinic_id}: the clinic config has no 'meta' section")
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware (the run's end)")
        meta = config.meta
        self._client = client
        self._pixel_id = meta.pixel_id
        self._target = f"pixel {meta.pixel_id}"
        self._names = {meta.event_names.consultation, meta.event_names.purchase}
        self._action_source = meta.action_source
        self._max_age = meta.event_age_limit_days * 86_400
        self._now = now.timestamp()
        self._test_event_code = test_event_code
        self._bisect_budget = bisect_budget
        self._ldu: tuple[int, int] | None = None
        if meta.limited_data_use:
            self._ldu = (
                int(getattr(meta, "ldu_country", 1)),
                int(getattr(meta, "ldu_state", 1000)),
            )
        self._paused: GraphFailure | None = None

    @property
    def client(self) -> MetaGraphClient:
        """The Graph client (``requests_sent``, ``waits``, ``sandbox``) for reports and tests."""
        return self._client

    def send(self, rows: Sequence[dict[str, Any]], *, validate_only: bool = False) -> list[RowResult]:
        """Send events (chunks of ``max_batch``); one result per row.

        ``validate_only`` runs the local checks only (Meta has no validate-only mode for CAPI;
        use ``test_event_code`` for a real dry send): passing rows come back DEFERRED with code
        ``validate_only``.

        Raises:
            MetaDestinationConfigError: token, permission, unknown pixel or a request-level 100;
                ``partial_results`` carries the rows already decided in this call.
        """
        results: list[RowResult] = []
        ready: list[tuple[str, Event]] = []
        seen: set[str] = set()
        for row in rows:
            key = str(row.get("event_id", "")) if isinstance(row, Mapping) else ""
            problem = precheck_event(
                row,
                names=self._names,
                action_source=self._action_source,
                now=self._now,
                max_age=self._max_age,
            )
            event = None if problem else build_event(row, self._ldu)
            if event is None:
                results.append(
                    RowResult(key, Outcome.REJECTED, problem or "invalid_format", transmitted=False)
                )
            elif key in seen:
                results.append(RowResult(key, Outcome.REJECTED, "duplicate_event_id", transmitted=False))
            else:
                seen.add(key)
                ready.append((key, event))
        prechecked = len(results)
        if validate_only:
            results += [
                RowResult(key, Outcome.DEFERRED, "validate_only", transmitted=False) for key, _ in ready
            ]
            return results
        budget = [self._bisect_budget]
        for start in range(0, len(ready), self.max_batch):
            self._deliver(ready[start : start + self.max_batch], results, budget)
        self._stop_if_every_event_refused(results, sent=results[prechecked:])
        counts = {o.value: sum(1 for r in results if r.outcome == o) for o in Outcome}
        log.info(
            "meta_events: %d rows for %s: %d failed local checks; outcomes %s",
            len(rows),
            self._target,
            prechecked,
            counts,
        )
        return results

    def _deliver(
        self,
        batch: list[tuple[str, Event]],
        out: list[RowResult],
        budget: list[int],
        *,
        carried: bool = False,
    ) -> None:
        """Send one batch; ``carried`` says a refused parent request already carried these rows
        (they left this process, whatever happens to them now)."""
        if self._paused is not None:
            out += _all(batch, Outcome.DEFERRED, f"throttled/{self._paused.label}", transmitted=carried)
            return
        if budget[0] <= 0:
            out += _all(batch, Outcome.DEFERRED, "bisect_budget", transmitted=carried)
            return
        budget[0] -= 1
        request = EventRequest(
            pixel_id=self._pixel_id,
            events=[event for _, event in batch],
            test_event_code=self._test_event_code,
        )
        failure: GraphFailure | None = None
        try:
            body, trace = self._client.request("POST", (self._pixel_id, "events"), request.get_params())
        except GraphCallError as exc:
            failure = exc.failure
        if failure is not None:
            # outside the except block, so nothing we raise carries the SDK error as context
            self._handle_failure(failure, batch, out, budget)
            return
        received = body.get("events_received")
        if received != len(batch):
            log.warning(
                "meta_events: %s reported %s events received for %d sent (fbtrace_id %s)",
                self._target,
                received,
                len(batch),
                trace,
            )
        out += _all(batch, Outcome.ACCEPTED, None, trace)

    def _handle_failure(
        self,
        failure: GraphFailure,
        batch: list[tuple[str, Event]],
        out: list[RowResult],
        budget: list[int],
    ) -> None:
        if failure.stops_run:
            raise MetaDestinationConfigError(describe_failure(failure, self._target), out)
        if failure.throttled:
            self._paused = failure
            log.warning(
                "meta_events: still throttled after back-off (code %s); deferring the rest of "
                "this run's events",
                failure.label,
            )
            out += _all(batch, Outcome.DEFERRED, f"throttled/{failure.label}", failure.fbtrace_id)
        elif failure.transient:
            out += _all(batch, Outcome.DEFERRED, f"transient/{failure.label}", failure.fbtrace_id)
        elif failure.code == 100 and len(batch) == 1:
            known = failure.subcode in EVENT_SUBCODES
            out += _all(
                batch, Outcome.REJECTED if known else Outcome.DEFERRED, failure.label, failure.fbtrace_id
            )
        elif failure.code == 100:
            log.info(
                "meta_events: %s rejected a request of %d events (code %s, fbtrace_id %s); bisecting",
                self._target,
                len(batch),
                failure.label,
                failure.fbtrace_id,
            )
            middle = len(batch) // 2
            self._deliver(batch[:middle], out, budget, carried=True)
            self._deliver(batch[middle:], out, budget, carried=True)
        else:
            # not known to be event-specific, so bisecting could cost 2n requests for nothing
            log.warning("meta_events: unexpected Meta error %s; deferring", failure.label)
            out += _all(batch, Outcome.DEFERRED, failure.label, failure.fbtrace_id)

    def _stop_if_every_event_refused(self, results: list[RowResult], *, sent: list[RowResult]) -> None:
        """Two or more events, every one refused alone with the same unknown 100 subcode and
        none accepted: the request, not the events, is what Meta refuses. Stop the run (exit 5,
        the events stay unfinished) rather than defer them quietly night after night."""
        labels = {r.code for r in sent if r.outcome is Outcome.DEFERRED and (r.code or "").startswith("100/")}
        if len(labels) != 1 or any(r.outcome is Outcome.ACCEPTED for r in sent):
            return
        refused = sum(1 for r in sent if r.code in labels)
        if refused < 2:
            return
        (label,) = labels
        raise MetaDestinationConfigError(
            f"Meta refused each of {refused} events sent to {self._target} alone with {label}, a subcode "
            "not known to describe one event, and accepted none: most likely the request itself (a "
            "--meta-test-event-code, the dataset's settings). They stay unfinished and go again with "
            "the next run; the fbtrace_ids are in the send ledger (docs/meta.md, Error handling)",
            results,
        )


def _all(
    batch: list[tuple[str, Event]],
    outcome: Outcome,
    code: str | None,
    trace: str | None = None,
    *,
    transmitted: bool = True,
) -> list[RowResult]:
    return [RowResult(key, outcome, code, trace, transmitted) for key, _ in batch]


def doctor_meta(config: ClinicConfig, environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """Offline readiness checks for Meta: ``(check, "ok" | "missing ...")``; never a secret."""
    checks: list[tuple[str, str]] = []
    meta = config.meta
    checks.append(("meta config", "ok" if meta is not None else "missing meta section"))
    checks.append(
        (
            ACCESS_TOKEN_ENV,
            "ok" if environ.get(ACCESS_TOKEN_ENV, "").strip() else f"missing {ACCESS_TOKEN_ENV}",
        )
    )
    checks.append(
        (
            APP_SECRET_ENV,
            "ok"
            if environ.get(APP_SECRET_ENV, "").strip()
            else f"missing {APP_SECRET_ENV} (optional; without it no appsecret_proof is sent)",
        )
    )
    checks.append(
        (
            APP_ID_ENV,
            "ok" if environ.get(APP_ID_ENV, "").strip() else f"missing {APP_ID_ENV} (optional)",
        )
    )
    if meta is not None:
        checks.append(("meta.pixel_id", "ok"))
        checks.append(
            (
                "meta.event_age_limit_days",
                f"ok ({meta.event_age_limit_days} days for {meta.action_source})",
            )
        )
        if meta.suppression_enabled:
            checks.append(
                (
                    "meta.suppression_audience_id",
                    "ok"
                    if meta.suppression_audience_id
                    else "missing meta.suppression_audience_id (suppression sync is skipped)",
                )
            )
    return checks


def make_meta_destinations(
    config: ClinicConfig,
    *,
    target: Literal["live", "sandbox"],
    now: datetime,
    sandbox: MetaSandbox | None = None,
    test_event_code: str | None = None,
    retry_wait: float | None = None,
    environ: Mapping[str, str] | None = None,
    session_seed: str | None = None,
) -> tuple[ConversionDestination, AudienceDestination]:
    """Build the Meta event and audience adapters on one Graph client.

    Args:
        target: ``"live"`` reads ``META_ACCESS_TOKEN`` (required), ``META_APP_SECRET`` and
            ``META_APP_ID`` (optional) from ``environ``; ``"sandbox"`` uses ``sandbox``, else
            the sandbox at ``META_SANDBOX_URL`` (token ``META_SANDBOX_TOKEN``, default
            ``sandbox-token``), else starts one whose clock is ``now`` and which lives until
            the process exits (reachable as ``events.client.sandbox``).
        now: the run's end (tz-aware): event age limits and the audience session seed use it.
        retry_wait: scales every wait (transient back-off base in seconds; a throttling minute
            lasts ``60 * retry_wait`` seconds, capped at ``900 * retry_wait``); default 1.0.
        environ: defaults to ``os.environ``.
        session_seed: seeds audience ``session_id``s; default ``"<clinic_id>:<now>:<nonce>"``.

    Raises:
        ConfigError: no ``meta`` section, or ``META_ACCESS_TOKEN`` missing for a live target.
    """
    from etl.destinations.meta_audience import MetaAudience

    if config.meta is None:
        raise ConfigError(f"{config.clinic_id}: the clinic config has no 'meta' section")
    scale = 1.0 if retry_wait is None else retry_wait
    env = os.environ if environ is None else environ
    secret: str | None = None
    app_id: str | None = None
    if target == "sandbox" and sandbox is None and env.get(SANDBOX_URL_ENV):
        # a sandbox in another process (e.g. a test that kills and reruns the CLI)
        from etl.sandbox.meta import DEFAULT_ACCESS_TOKEN

        token = env.get(SANDBOX_TOKEN_ENV) or DEFAULT_ACCESS_TOKEN
        graph_url: str | None = env[SANDBOX_URL_ENV]
    elif target == "sandbox":
        if sandbox is None:
            from etl.sandbox.meta import MetaSandbox

            sandbox = MetaSandbox(now=now).start()
        token, secret, graph_url = sandbox.access_token, sandbox.app_secret, sandbox.url
    elif target == "live":
        token = env.get(ACCESS_TOKEN_ENV, "").strip()
        if not token:
            raise ConfigError(
                f"{ACCESS_TOKEN_ENV} is not set: a live Meta run needs a system-user access token"
            )
        secret = env.get(APP_SECRET_ENV, "").strip() or None
        app_id = env.get(APP_ID_ENV, "").strip() or None
        graph_url = None
    else:
        raise ValueError(f"unknown target {target!r}")
    client = MetaGraphClient(
        access_token=token,
        app_secret=secret,
        app_id=app_id,
        graph_url=graph_url,
        retry_wait=scale,
        throttle_unit=60.0 * scale,
        max_throttle_wait=900.0 * scale,
    )
    client.sandbox = sandbox
    events = MetaEvents(config, client, now=now, test_event_code=test_event_code)
    audience = MetaAudience(config, client, now=now, session_seed=session_seed)
    return events, audience
