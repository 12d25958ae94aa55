"""The outbox: exactly what would be (or will be) sent, one JSON object per line (SPEC section 5).

Files are written into a temporary sibling folder and renamed into place, so a run that fails
leaves either the previous complete outbox or none, never half of one. Lines are sorted by the
payload builders and serialised with sorted keys, so the same inputs and secret give
byte-identical files.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

OUTBOX_FILES = {
    "google_conversions": "google_conversions.jsonl",
    "meta_events": "meta_events.jsonl",
    "google_customer_match": "google_customer_match.jsonl",
    "meta_audience": "meta_audience.jsonl",
}
SUMMARY_FILE = "summary.json"


def _line(row: Mapping[str, Any]) -> str:
    return json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def write_outbox(
    directory: Path, outbound: Mapping[str, Sequence[Mapping[str, Any]]], summary: Mapping[str, Any]
) -> Path:
    """Atomically (re)place ``directory`` with the four JSONL files and ``summary.json``."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for destination, name in OUTBOX_FILES.items():
        with (staging / name).open("w", encoding="utf-8", newline="\n") as fh:
            for row in outbound.get(destination, ()):
                fh.write(_line(row) + "\n")
    write_summary(staging, summary)
    old = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    staging.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def write_summary(directory: Path, summary: Mapping[str, Any]) -> None:
    text = json.dumps(summary, sort_keys=True, indent=2) + "\n"
    tmp = directory / (SUMMARY_FILE + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(directory / SUMMARY_FILE)


def read_rows(directory: Path, destination: str) -> Iterator[dict[str, Any]]:
    path = Path(directory) / OUTBOX_FILES[destination]
    if not path.exists():
        return
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def read_summary(directory: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((Path(directory) / SUMMARY_FILE).read_text(encoding="utf-8"))
    return result
