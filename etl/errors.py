"""Domain exceptions.

Every message names where (file, line, column, key path, field path) and why (a stable reason
code), and gives counts; none ever carries a value from the data, because exceptions end up in
logs, Airflow task summaries and on-failure notifications (SPEC section 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class MedspaError(Exception):
    """Base of every error this package raises on purpose; the CLI prints these without traceback."""

    exit_code = 2
    retryable = False  # about configuration or data, which a retry does not change


class ConfigError(MedspaError):
    """The clinic YAML or the environment is wrong; nothing was read or sent."""


@dataclass(frozen=True)
class RowProblem:
    """One bad cell: where it is and why, never what it holds."""

    file: str
    line: int | None
    column: str | None
    reason: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f", line {self.line}"
        if self.column is not None:
            where += f", column '{self.column}'"
        return f"{where}: {self.reason}"


class InputError(MedspaError):
    """An export cannot be read as its profile says; collected per file, raised once.

    Args:
        problems: every problem found (the message shows the first few and the total).
    """

    def __init__(self, problems: list[RowProblem], *, shown: int = 10) -> None:
        self.problems = problems
        head = "\n  ".join(str(p) for p in problems[:shown])
        more = f"\n  ... and {len(problems) - shown} more" if len(problems) > shown else ""
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{len(problems)} input {noun}:\n  {head}{more}")


class StagingError(MedspaError):
    """The staging database refused a load; names the table, the error class and SQLSTATE only
    (a driver's message quotes the offending row, which holds record IDs and hashes)."""

    exit_code = 7


class GateViolation(MedspaError):
    """The PHI egress gate refused a payload: nothing was written to the outbox or sent."""

    exit_code = 3

    def __init__(self, destination: str, violations: list[tuple[str, str]], *, shown: int = 10) -> None:
        self.destination = destination
        self.violations = violations
        head = "\n  ".join(f"{path}: {reason}" for path, reason in violations[:shown])
        more = f"\n  ... and {len(violations) - shown} more" if len(violations) > shown else ""
        super().__init__(
            f"PHI egress gate stopped the run ({destination}, {len(violations)} violations; "
            f"nothing written or sent):\n  {head}{more}"
        )


class QualityGateFailed(MedspaError):
    """A critical data-quality expectation failed; the run stopped before the outbox."""

    exit_code = 4


class _Stop(MedspaError):
    """A platform stop raised mid-upload; it carries what was already decided before it.

    ``partial_results`` are per-row results (``RowResult``) the platform gave before the stop,
    which ``etl.deliver`` records so they are not sent again; ``partial_audience`` is an
    ``AudienceResult`` for a list that was already changed (e.g. emptied by a full resync);
    ``counts`` an upload's counts up to the stop, which the caller writes to its results.
    """

    def __init__(self, message: str, partial_results: list[Any] | None = None) -> None:
        super().__init__(message)
        self.partial_results: list[Any] = list(partial_results or [])
        self.partial_audience: Any = None
        self.counts: dict[str, Any] | None = None  # an upload's counts up to the stop


class DestinationConfigError(_Stop):
    """The ad platform says the account is not set up (auth, terms, action missing): stop the run."""

    exit_code = 5


class LegalBasisRefused(DestinationConfigError):
    """The clinic's legal-basis registry has no current entry for the platform: nothing goes
    there (``compliance.legal_basis``). A stop for that platform alone, as an account problem
    is; the fix is in the YAML, so it exits like a config error."""

    exit_code = 2


class SendingStopped(DestinationConfigError):
    """Someone stopped the clinic's sends to the platform (the kill switch, ``etl.switches``):
    nothing more goes there until ``resume-sending``. Every path that stops one platform's sends
    and records what was decided before handles it as it handles an account problem; the
    unsent rows stay planned, so a run after the resume sends them once."""

    exit_code = 10


class QuotaExhausted(_Stop):
    """The platform's daily quota is spent: what is unsent stays planned for the next run."""

    exit_code = 6


class SendInProgress(MedspaError):
    """Another process is sending to this clinic's destination (``etl.leases``); nothing was
    sent. Unlike the other errors this one passes: a retry after the other sender ends works."""

    exit_code = 8
    retryable = True


class RunInProgress(MedspaError):
    """Another process is working in this run's folder (``etl.leases.hold_run_folder``); this
    step changed nothing, and a retry after the other one ends works."""

    exit_code = 8
    retryable = True


class NotPlanned(MedspaError):
    """A step found no plan or no published outbox for its run: the step before it has not run
    for this interval since its extract (a step retried or cleared on its own, out of order).
    Nothing was changed; run the interval again from its extract."""


class MachineError(MedspaError):
    """The machine refused a file operation of a step (a full disk, a file size limit, a folder
    it may not write): names the step, the path and the system's reason, never file contents.
    What the step wrote is either complete or not published; a rerun once it is fixed resumes."""

    exit_code = 9
    retryable = True  # space freed or a permission fixed between tries lets a retry pass

    @classmethod
    def of(cls, exc: OSError, step: str, *, sends: bool = True) -> MachineError:
        """``sends``: the run could have sent (a dry run's rerun has no ledger to lean on)."""
        import errno

        reason = exc.strerror or str(exc)[:200] or type(exc).__name__
        code = errno.errorcode.get(exc.errno or -1)
        where = f" at {exc.filename}" if exc.filename else ""
        return cls(
            f"{step}: {reason}{f' ({code})' if code else ''}{where}; free the space or fix the permission, "
            "then rerun the interval" + (" (what was sent is in the send ledger)" if sends else "")
        )
