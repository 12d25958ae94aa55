"""Running the data-quality suites in Great Expectations: counts in, ``CheckResult`` out.

Split from ``etl.quality`` (the gates) so that module reads as the gates' order and consequences;
the contract is issue #5 and ``docs/quality.md``. GX is imported inside functions only: its
import costs seconds and must not be paid by ``import etl.*`` or a DAG parse.

PHI-safe by construction (STYLE items 12 and 22): GX is asked for counts and row keys only
(``SUMMARY`` with ``exclude_unexpected_values: True`` and an opaque
``unexpected_index_column_names``, so its partial index list holds failing rows' keys and no
value; with the named index it holds every failing key, of which three are kept); it runs in an ephemeral context (nothing written to disk) with progress bars off and
its logger at WARNING; what is kept of a result is a ``CheckResult`` of names, counts and, where
the key is a line or a day, the first few failing keys.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from etl.quality_suites import DEFAULT_THRESHOLDS, ROW_KEY, Suite, Thresholds, build_suites

ResultHook = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class CheckResult:
    """One expectation's outcome for one run: names and counts, never a value."""

    suite: str
    check: str
    severity: str
    success: bool
    unexpected_count: int | None
    element_count: int | None
    error: bool = False  # GX could not evaluate it (a missing column): counted as a failure
    # where to look, e.g. "export lines 7, 12, 40, ...": the first failing rows' keys where
    # the key is an export line, an outbox line or a day; kept in memory only, not stored
    where: str = ""

    @property
    def label(self) -> str:
        return f"{self.suite}.{self.check}"

    def describe(self) -> str:
        if self.error:
            return f"{self.label}: could not be evaluated (column missing or of the wrong type)"
        if self.unexpected_count is None:
            return f"{self.label}: failed (table-level check)"
        where = f" ({self.where})" if self.where else ""
        return f"{self.label}: {self.unexpected_count:,} of {self.element_count or 0:,} rows{where}"


# the row keys worth showing: a line to open in the export or the outbox, a day to look at; the
# other keys (a schema row, an opaque ID, a metric) point at nothing a person can open
_EXAMPLE_NOUNS = {"source_line": "export line", "line": "outbox line", "day": "day"}  # + "s"
EXAMPLES_SHOWN = 3


# counts plus an opaque row key, never values (STYLE item 22)
RESULT_FORMAT = {
    "result_format": "SUMMARY",
    "partial_unexpected_count": EXAMPLES_SHOWN,
    "exclude_unexpected_values": True,
    "unexpected_index_column_names": [ROW_KEY],
    "return_unexpected_index_query": False,
}
_COLUMN_KWARGS = ("column", "column_A", "column_B")


def _condition_columns(condition: Any, out: set[str]) -> bool:
    """Add the columns a (serialised) row condition reads; False if it cannot be read structurally."""
    if isinstance(condition, dict):
        column = condition.get("column")
        if isinstance(column, dict) and isinstance(column.get("name"), str):
            out.add(column["name"])
        return all(_condition_columns(c, out) for c in condition.get("conditions", []))
    return False  # a condition string (pandas query syntax): which columns it reads is not known here


def needed_columns(suite: Suite) -> list[str] | None:
    """The columns the suite's expectations read, or ``None`` when one needs the whole frame.

    GX costs grow with the columns of the frame it is given (it hashes the whole batch to label
    it, among other passes), not with the columns an expectation reads: the flattened outbound
    frames carry columns for the report and for other checks that no suite reads. A table-level
    expectation (the schema suites) or a row condition given as a string gets the whole frame.
    """
    columns: set[str] = set()
    for expectation in suite.expectations:
        kwargs = expectation.configuration.to_json_dict()["kwargs"]
        named = [kwargs[k] for k in _COLUMN_KWARGS if isinstance(kwargs.get(k), str)]
        named += [c for c in kwargs.get("column_list") or [] if isinstance(c, str)]
        if not named:
            return None
        columns.update(named)
        condition = kwargs.get("row_condition")
        if condition is not None and not _condition_columns(condition, columns):
            return None
    return sorted(columns)


def suite_frame(frame: pd.DataFrame, suite: Suite) -> pd.DataFrame:
    """What GX is given for ``suite``: the columns it reads, indexed by the opaque key ``ROW_KEY``.

    A named index is GX's fast path for ``unexpected_index_column_names`` (a plain list of keys;
    key columns are read row by row), and it cannot carry a value: only the key is in it. A
    column a check needs but the frame lacks is left out, so that check fails as not evaluable.
    """
    key = suite.key
    values = frame[key].to_numpy() if key in frame.columns else np.arange(len(frame))
    if not len(values):
        # an empty frame's key column is float64 by pandas' default, and GX slices a float
        # index by label (deprecated; positional in a future pandas)
        values = np.array([], dtype=object)
    wanted = needed_columns(suite)
    if wanted is None:
        keyed = frame.copy(deep=False)
    else:
        keyed = pd.DataFrame({c: frame[c] for c in frame.columns if c in wanted}, index=frame.index)
    keyed.index = pd.Index(values, name=ROW_KEY)
    return keyed


@contextmanager
def _without_batch_fingerprint() -> Iterator[None]:
    """Keep GX from hashing each in-memory batch (MD5 of pandas' hash of every row and column).

    The fingerprint only labels the batch in GX's result metadata, which is not kept here, and it
    cost about a third of all validation time at a million rows (most of it for the 2.7 million
    hashed values and the extracts' unique IDs). GX skips it for frames of at least
    ``HASH_THRESHOLD`` bytes; the threshold is lowered for the duration of ``run_suites`` only. If
    a GX release drops the constant, nothing changes but the speed (a test names the constant).
    """
    from great_expectations.execution_engine import pandas_execution_engine as engine

    saved = getattr(engine, "HASH_THRESHOLD", None)
    if saved is None:
        yield
        return
    engine.HASH_THRESHOLD = 0
    try:
        yield
    finally:
        engine.HASH_THRESHOLD = saved


def _context() -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # some GX modules pin their own logger to INFO; none of ours needs more than warnings
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("great_expectations")]:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return context


def _raised(info: Any) -> bool:
    if not isinstance(info, dict):
        return False
    if "raised_exception" in info:
        return bool(info["raised_exception"])
    return any(isinstance(v, dict) and v.get("raised_exception") for v in info.values())


def _where(suite: Suite, counts: Mapping[str, Any]) -> str:
    """Where to look: the first failing rows' keys from GX's partial index list, where they are
    lines or days a person can open."""
    if suite.key not in _EXAMPLE_NOUNS:
        return ""
    keys: list[str] = []
    # GX's shape varies by expectation: one ``{ROW_KEY: [key]}`` per row, one ``{ROW_KEY: [keys]}``
    # for them all, or bare lists of keys
    for item in counts.get("partial_unexpected_index_list") or ():
        found = item.get(ROW_KEY) if isinstance(item, dict) else item
        for key in found if isinstance(found, list | tuple) else [found]:
            if key is not None and len(keys) < EXAMPLES_SHOWN:
                keys.append(str(pd.Timestamp(key).date()) if suite.key == "day" else str(key))
    if not keys:
        return ""
    noun = _EXAMPLE_NOUNS[suite.key] + ("s" if len(keys) > 1 else "")
    more = ", ..." if int(counts.get("unexpected_count") or 0) > len(keys) else ""
    return f"{noun} {', '.join(keys)}{more}"


def _collect(suite: Suite, result: Any) -> list[CheckResult]:
    order = {e.meta["check"]: i for i, e in enumerate(suite.expectations)}
    out = []
    for item in result.results:
        config = item.expectation_config
        counts = item.result or {}
        severity = getattr(config.severity, "value", config.severity)
        unexpected = counts.get("unexpected_count")
        elements = counts.get("element_count")
        out.append(
            CheckResult(
                suite=suite.name,
                check=config.meta["check"],
                severity=str(severity),
                success=bool(item.success),
                unexpected_count=None if unexpected is None else int(unexpected),
                element_count=None if elements is None else int(elements),
                error=_raised(item.exception_info),
                where="" if item.success else _where(suite, counts),
            )
        )
    return sorted(out, key=lambda r: order[r.check])


def run_suites(
    data: Mapping[str, pd.DataFrame],
    names: Iterable[str],
    parameters: Mapping[str, Any],
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
    on_result: ResultHook | None = None,
) -> list[CheckResult]:
    """Validate each named suite on its frame (``data[suite.frame]``) in one ephemeral GX context.

    Args:
        data: frames by name (``etl.quality_frames``); they must hold no raw identifier.
        parameters: values for the suites' ``$PARAMETER`` placeholders.
        on_result: called with (suite, GX result as a JSON dict) for inspection in tests; the
            dict is counts and configuration only, given the result format used here.
    """
    import gc

    try:
        return _run_suites(data, names, parameters, thresholds, on_result)
    finally:
        if "great_expectations" in sys.modules:
            from great_expectations.data_context import set_context

            # GX keeps the last context as the process's "project", and with it the data sources,
            # validators and every frame validated (half a gigabyte of extracts at a million
            # appointments), until the next context replaces it
            set_context(None)
        # GX leaves its context, validators and frame copies in reference cycles: collected here,
        # where they are made, so the pipeline's other steps never pay a full collection
        gc.collect()


def _run_suites(
    data: Mapping[str, pd.DataFrame],
    names: Iterable[str],
    parameters: Mapping[str, Any],
    thresholds: Thresholds,
    on_result: ResultHook | None,
) -> list[CheckResult]:
    import great_expectations as gx

    suites = build_suites(thresholds)
    context = _context()
    source = context.data_sources.add_pandas("medspa")
    out: list[CheckResult] = []
    with _without_batch_fingerprint():
        for name in names:
            suite = suites[name]
            batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("whole")
            gx_suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=suite.expectations))
            definition = context.validation_definitions.add(
                gx.ValidationDefinition(name=name, data=batch, suite=gx_suite)
            )
            # GX's named-index fast path lists every failing row's key, not the first few:
            # asked only of the suites whose keys are shown (lines, days), where it is the price
            # of saying where to look (about 3 us per failing row)
            wants_keys = suite.key in _EXAMPLE_NOUNS
            result = definition.run(
                batch_parameters={"dataframe": suite_frame(data[suite.frame], suite)},
                result_format=RESULT_FORMAT
                if wants_keys
                else {**RESULT_FORMAT, "partial_unexpected_count": 0},
                expectation_parameters=dict(parameters),
            )
            if on_result is not None:
                on_result(name, result.to_json_dict())
            out.extend(_collect(suite, result))
    return out
