"""Run a source query (SQL file + SQLAlchemy URL) and hand back its rows as export-like text.

The SQL source of SPEC section 3 and the extract brief: the query lives in ``sql/*.sql`` and gets
the clinic and the run's window only as bound parameters (``:clinic_id``, ``:start``, ``:end``;
STYLE rule 4). Values come back as the text a CSV export would hold, so ``etl.extract`` maps and
parses them exactly like a file; a row's "line" is its 1-based row number. Parameters are hidden
from SQLAlchemy's error messages and no message carries a value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
from sqlalchemy import DateTime, String, bindparam, create_engine, text
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from etl.errors import ConfigError, InputError, RowProblem

PARAMETERS = ("clinic_id", "start", "end")
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _aware_utc(value: datetime | None, label: str) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError(f"{label} must be timezone-aware")
    return value.astimezone(UTC)


def as_text(value: object) -> str:
    """A database value as the text a CSV export would hold (naive times stay naive)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _float_text(value)
    if isinstance(value, Decimal):
        return format(value, "f")  # never exponent notation, which no amount pattern accepts
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def _float_text(value: float) -> str:
    """A float's digits, never in exponent notation (no amount pattern accepts it).

    A single-precision column (``real``) arrives widened: 760.1 as 760.0999755859375, whose
    shortest double digits run past a float32's 7 to 9. Such a value, one a float32 holds
    exactly, is printed as the float32's shortest digits (760.1). A double with 9 significant
    digits or fewer (1500000.25, 134217744) is printed as it is: whether it came from a
    ``real`` or a ``double``, those digits are its exact value.
    """
    digits = np.format_float_positional(value, trim="-")
    significant = len(digits.lstrip("-").replace(".", "").strip("0"))
    if (
        significant > 9
        and math.isfinite(value)
        and abs(value) <= _FLOAT32_MAX
        and float(np.float32(value)) == value
    ):
        return np.format_float_positional(np.float32(value), trim="-")
    return digits


def _cause(exc: SQLAlchemyError) -> str:
    """``ProgrammingError, SQLSTATE 42601``: the error's class and code, never its text."""
    orig = getattr(exc, "orig", None)
    name = type(orig or exc).__name__
    if pgcode := getattr(orig, "pgcode", None):
        return f"{name}, SQLSTATE {pgcode}"
    if sqlite := getattr(orig, "sqlite_errorname", None):
        return f"{name}, {sqlite}"
    return name


def _server(engine: Any) -> str:
    """`` at host:port/database`` from the URL, never its user or password; "" for a file."""
    url = engine.url
    if not url.host:
        return ""
    return (
        f" at {url.host}"
        + (f":{url.port}" if url.port else "")
        + (f"/{url.database}" if url.database else "")
    )


@dataclass(frozen=True)
class QueryResult:
    """The rows of one source query; ``name`` is the query file's name, for messages."""

    name: str
    header: list[str]
    rows: list[Sequence[Any]]

    @classmethod
    def run(
        cls,
        sql_url: str,
        query: Path,
        *,
        clinic_id: str,
        start: datetime | None,
        end: datetime | None,
        timezone: str | None = None,
    ) -> QueryResult:
        """Execute ``query`` with whichever of the three parameters it uses.

        ``timezone`` (the clinic's) is the PostgreSQL session's time zone: a ``timestamp``
        column without a zone holds clinic-local times, and PostgreSQL compares it with the
        bound window instants in the session's zone (the server's default, often UTC, would
        shift a backfill's window by the clinic's offset). Other databases get the window as
        the clinic's wall-clock times without a zone.

        Raises:
            InputError: the query file does not exist.
            ConfigError: the URL is invalid, or the query binds an unknown parameter or one
                that was not given (binding NULL would silently select nothing).
            ValueError: ``start`` or ``end`` is naive.
        """
        try:
            sql = query.read_text(encoding="utf-8-sig")  # Notepad's BOM is no part of the query
        except FileNotFoundError:
            raise InputError([RowProblem(query.name, None, None, "file not found")]) from None
        except UnicodeDecodeError:
            raise InputError(
                [RowProblem(query.name, None, None, "not UTF-8 text: save the query file as UTF-8")]
            ) from None
        except OSError as exc:  # a folder, a file it may not read
            reason = f"cannot read the query file ({exc.strerror or type(exc).__name__})"
            raise InputError([RowProblem(query.name, None, None, reason)]) from None
        # whole-line comments go before text() parses the query: a ":start" in a comment was
        # bound as a parameter and failed on the database with nothing to say why
        statement = text(
            "\n".join("" if line.lstrip().startswith("--") else line for line in sql.splitlines())
        )
        wanted = sorted(statement.compile().params)
        given: dict[str, object] = {
            "clinic_id": clinic_id,
            "start": _aware_utc(start, "start"),
            "end": _aware_utc(end, "end"),
        }
        if unknown := [p for p in wanted if p not in PARAMETERS]:
            raise ConfigError(f"{query.name}: unknown parameters {unknown}; allowed: {PARAMETERS}")
        if unset := [p for p in wanted if given[p] is None]:
            raise ConfigError(f"{query.name}: the query binds {unset} but no value was given")
        try:
            engine = create_engine(sql_url, hide_parameters=True)
        except (ArgumentError, ValueError):  # ValueError: e.g. a port that is no number
            raise ConfigError("sql_url is not a valid SQLAlchemy URL") from None
        except ImportError as exc:  # the URL names a driver this environment lacks
            raise ConfigError(
                f"sql_url names a database driver that is not installed ({type(exc).__name__}); "
                "install it into the environment, or use a driver it has (e.g. postgresql+psycopg2)"
            ) from None
        instant = DateTime(timezone=True)
        if timezone and engine.dialect.name != "postgresql":
            # no session time zone to compare in: SQLite (and MySQL's DATETIME) hold times without
            # a zone, which SPEC section 3 reads as clinic-local, so the window is bound as the
            # clinic's wall-clock times (UTC text would shift it by the clinic's offset)
            zone = ZoneInfo(timezone)
            for key in ("start", "end"):
                if isinstance(moment := given[key], datetime):
                    given[key] = moment.astimezone(zone).replace(tzinfo=None)
            instant = DateTime(timezone=False)
        statement = statement.bindparams(
            *(bindparam(p, given[p], String() if p == "clinic_id" else instant) for p in wanted)
        )
        # the class names and SQLSTATE say what went wrong; the driver's text can quote cell
        # values or the URL, so it is not shown (run the query in the database's own client)
        try:
            connection = engine.connect()
        except SQLAlchemyError as exc:
            engine.dispose()
            where = _server(engine)
            reason = (f"cannot connect to the source database{where} ({_cause(exc)}); check sql_url / "
                      "sql_url_env, the credentials and that the server is reachable")  # fmt: skip
            raise InputError([RowProblem(query.name, None, None, reason)]) from None
        try:
            with connection:
                if timezone and connection.dialect.name == "postgresql":
                    connection.execute(text("SELECT set_config('TimeZone', :tz, false)"), {"tz": timezone})
                result = connection.execute(statement)
                return cls(query.name, list(result.keys()), list(result.fetchall()))
        except SQLAlchemyError as exc:
            reason = f"the query failed on the source database ({_cause(exc)})"
            raise InputError([RowProblem(query.name, None, None, reason)]) from None
        except (ValueError, OverflowError) as exc:  # e.g. a year before 1 (BC), which Python has not
            reason = f"the driver could not convert a value of the result ({type(exc).__name__})"
            raise InputError([RowProblem(query.name, None, None, reason)]) from None
        finally:
            engine.dispose()

    def read(self, indices: Sequence[int]) -> tuple[list[pa.Array], np.ndarray]:
        """The result columns at ``indices`` as text, and each row's number (from 1)."""
        arrays = [pa.array([as_text(row[i]) for row in self.rows], pa.string()) for i in indices]
        return arrays, np.arange(1, len(self.rows) + 1, dtype=np.int64)
