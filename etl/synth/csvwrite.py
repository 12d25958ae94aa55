"""CSV writing for the synthetic clinic: a small RFC 4180 writer with minimal quoting.

Why: the exports must read back exactly like a CRM or PMS export (``csv.QUOTE_MINIMAL``, UTF-8,
``\\n`` line ends; SPEC section 3, ``shared/SPEC.md``) and a million rows must be written in
seconds, so whole pyarrow columns are joined into lines without per-row Python.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from etl.synth.text import _join
from etl.synth.vocab import Strings

# columns whose values can hold a comma, a quote or a line break; the others are built from
# digits, letters and URL characters only (tests read every file back with the csv module)
_FREE_TEXT = frozenset(
    ("first_name", "last_name", "city", "service", "status", "revenue", "source",
     "treatment_interest", "notes", "landing_page_url")
)  # fmt: skip


def _csv_field(values: Strings) -> Strings:
    special = pc.fill_null(pc.match_substring_regex(values, '[",\r\n]'), False)
    if not pc.any(special).as_py():
        return values
    return pc.if_else(special, _join('"', pc.replace_substring(values, '"', '""'), '"'), values)


def _write_csv(path: Path, columns: dict[str, Strings], chunk: int = 200_000) -> None:
    """RFC 4180 with minimal quoting (like ``csv.QUOTE_MINIMAL``), UTF-8, ``\\n`` line ends."""
    rows = len(next(iter(columns.values())))
    with path.open("wb") as out:
        out.write((",".join(columns) + "\n").encode("utf-8"))
        for lo in range(0, rows, chunk):
            fields = [
                _csv_field(col.slice(lo, chunk)) if name in _FREE_TEXT else col.slice(lo, chunk)
                for name, col in columns.items()
            ]
            blank_is_empty = {"null_handling": "replace", "null_replacement": ""}
            fields[-1] = pc.binary_join_element_wise(fields[-1], "\n", "", **blank_is_empty)
            lines = pc.binary_join_element_wise(*fields, ",", **blank_is_empty)
            # the value buffer of the joined array is exactly the text of these lines
            offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32)
            first, last = offsets[lines.offset], offsets[lines.offset + len(lines)]
            out.write(memoryview(lines.buffers()[2])[first:last])
