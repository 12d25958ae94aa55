"""Read a CSV export as string columns, with the physical line where every record starts.

``etl.extract`` maps these columns onto the canonical frames of ``docs/architecture.md``; the
robustness rules (UTF-8 with or without BOM, cp1252 from Excel, CRLF, quoted newlines, blank
lines) are SPEC section 3 as refined by the extract brief. Nothing here interprets a value, and
no message carries one: problems name the file, the physical line and a reason.

Two readers give the same result. The fast one parses with pyarrow and finds record starts with
a vectorised scan of the bytes (a newline ends a record when an even number of quote characters
precede it). That scan is exact for RFC 4180 files; when pyarrow and the scan disagree on the row
count, or the file is not strictly RFC 4180 (a quote that neither opens a field, closes one nor
doubles one, e.g. a stray quote inside an unquoted field, which can leave the count right but
the lines shifted; a bare-CR line end; a ragged row), the file is read again with the standard
``csv`` module, which is slower but tracks physical lines itself.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from etl.errors import InputError, RowProblem

_BOM = codecs.BOM_UTF8
# an unquoted "$1,200.00", "1,200" or "(1,200.50)" in a money column, read as two cells
_AMOUNT_HEAD = re.compile(r"\(?-?[$€£]?-?\d{1,3}")
_AMOUNT_TAIL = re.compile(r"\d{3}(?:,\d{3})*(?:\.\d+)?\)?")
_NEWLINE, _CR, _QUOTE, _COMMA = 0x0A, 0x0D, 0x22, 0x2C
# a UTF-8 lowercase accented Latin letter, U+00E1..U+00FF (á é í ñ ó ö ü ç ...): cp1252 reads
# it as "Ã" and a symbol (Ã©); "Ã" before a no-break space (à) is left out, which cp1252 text
# of its own can hold
_UTF8_LETTER = re.compile(rb"\xc3[\xa1-\xbf]")
_SCAN_CHUNK = 1 << 20  # bytes compared at a time: no temporary as large as the file
_FIELD_LIMIT = 2**31 - 1  # the csv module's default (128 KiB) refused a long note in a column never read


def _problem(name: str, line: int | None, reason: str) -> InputError:
    return InputError([RowProblem(name, line, None, reason)])


def _line_at(raw: bytes, offset: int) -> int:
    return raw.count(b"\n", 0, offset) + 1


def _is_utf8(data: bytes) -> bool:
    """Whether ``data`` is valid UTF-8, checked by arrow without building a str of the file.

    Arrow's validator accepts exactly what Python's strict UTF-8 codec accepts; a file it
    rejects is decoded by Python, which then reports the fault as before.
    """
    offsets = pa.py_buffer(np.array([0, len(data)], dtype=np.int64))
    try:
        pa.LargeStringArray.from_buffers(1, offsets, pa.py_buffer(data)).validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _decode(raw: bytes, name: str, encoding: str | None, columns: frozenset[str] = frozenset()) -> bytes:
    """Return the file as UTF-8 bytes without a BOM (the only input pyarrow parses)."""
    if encoding is None and raw.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        encoding = "utf-32"  # before UTF-16: UTF-32's little-endian mark starts with UTF-16's
    elif encoding is None and raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"  # a UTF-16 CSV (Excel's "Unicode text" save is UTF-16 too, tab-separated)
    if encoding is None:
        body = raw[len(_BOM) :] if raw.startswith(_BOM) else raw
        head = body[:4096].partition(b"\n")[0]
        if head.count(b"\x00") * 4 >= len(head) > 0:
            # ASCII headers in UTF-16 or UTF-32 are half or more NUL bytes; read as UTF-8 every
            # required column would be "missing": say what it is instead
            reason = "UTF-16 or UTF-32 text without a byte-order mark; save the export as CSV UTF-8"
            raise _problem(name, 1, reason)
        if _is_utf8(body):
            return body
        _refuse_mixed_utf8(body, name, columns)
        try:
            return body.decode("cp1252").encode("utf-8")
        except UnicodeDecodeError as exc:
            line, column = _where(body, exc.start, "cp1252", columns)
            raise InputError([RowProblem(name, line, column, "neither UTF-8 nor cp1252 text")]) from None
    try:
        codec = codecs.lookup(encoding).name
    except LookupError:
        raise _problem(name, None, "unknown encoding in the source's 'encoding' setting") from None
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as exc:
        raise _problem(name, _line_at(raw, exc.start), f"not valid {codec} text") from None
    except (LookupError, UnicodeError):  # rot13, base64, zlib, undefined: codecs, not text encodings
        raise _problem(
            name, None, f"the source's 'encoding' setting ({codec}) is not a text encoding"
        ) from None
    if codec == "utf-8":
        return raw[len(_BOM) :] if raw.startswith(_BOM) else raw
    header = text.removeprefix("\ufeff").partition("\n")[0]
    if codec.startswith("utf-16") and "\t" in header and "," not in header:
        # read as one column, every required column would be "missing": say what it is instead
        raise _problem(name, 1, 'tab-separated (Excel "Unicode text"); save it as "CSV UTF-8" instead')
    return text.removeprefix("\ufeff").encode("utf-8")


def _refuse_mixed_utf8(body: bytes, name: str, columns: frozenset[str]) -> None:
    """A UTF-8 file with a few bytes that are not (one row pasted from a cp1252 source, or the
    file cut mid-character) is refused, not re-read as cp1252, which would turn every accented
    name in it into mojibake that hashes to nothing any platform matches.

    UTF-8 is told from cp1252 by counting: more well-formed multi-byte UTF-8 characters than
    malformed bytes. A cp1252 file rarely forms even one (an accented capital followed by a
    curly quote or a no-break space does), and its accented letters are all malformed UTF-8.

    Each problem is put where the minority encoding is, the cell to retype: the first byte that
    is not UTF-8 in UTF-8 text, the first UTF-8 letter in cp1252 text. On a tie (one of each)
    neither is the odd one out, so both places are named, each saying what is there.
    """
    text = body.decode("utf-8", errors="replace")
    malformed = text.count("\ufffd")
    wellformed = len(text) - len(text.encode("ascii", "ignore")) - malformed
    save = "(mixed encodings); save the export as CSV UTF-8"
    if wellformed > malformed:
        line, column = _not_utf8_at(body, columns)
        reason = f"UTF-8 text with bytes that are not UTF-8 {save}"
        raise InputError([RowProblem(name, line, column, reason)])
    for seen, letter in enumerate(_UTF8_LETTER.finditer(body)):
        # mostly cp1252, but with a UTF-8 accented letter ("é" as C3 A9, which cp1252 would read
        # as "Ã©") in a column the profile reads: a row pasted from a UTF-8 source; cp1252 text
        # of its own holds "Ã" before a symbol such as © or ± in no name
        line, column = _where(body, letter.start(), "cp1252", columns)
        if column is not None:
            if wellformed < malformed:
                reason = f"cp1252 text with a UTF-8 character here {save}"
                raise InputError([RowProblem(name, line, column, reason)])
            byte_line, byte_column = _not_utf8_at(body, columns)
            letter_here = f"a UTF-8 character, in a file with as many bytes that are not UTF-8 {save}"
            byte_here = f"a byte that is not UTF-8, in a file with as many UTF-8 characters {save}"
            problems = [
                RowProblem(name, line, column, letter_here),
                RowProblem(name, byte_line, byte_column, byte_here),
            ]
            raise InputError(sorted(problems, key=lambda problem: problem.line or 0))
        if seen >= 20:  # in columns never read (notes): not this check's business
            break


def _not_utf8_at(body: bytes, columns: frozenset[str]) -> tuple[int | None, str | None]:
    """The line and known column of the first byte of ``body`` that is not UTF-8."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _where(body, exc.start, "utf-8", columns)
    return None, None


def _where(body: bytes, offset: int, codec: str, columns: frozenset[str]) -> tuple[int, str | None]:
    """The line and header column of the undecodable byte at ``offset``, so a clinic can find
    the one cell to retype; the column is None when the byte is in the header, the record has
    more cells than the header, or the header cell is not one of the profile's ``columns``
    (then the "header" may be a row of data: its cell is never shown). Decoded with
    replacement characters, which leave every byte before ``offset`` where it was."""
    line = _line_at(body, offset)
    text = body.decode(codec, errors="replace")
    at = len(body[:offset].decode(codec, errors="replace"))
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    record_line = 1  # the first line of the record holding the byte
    try:
        while True:
            first = reader.line_num + 1
            if first > line:
                break
            row = next(reader)
            if header is None and any(cell.strip() for cell in row):
                if reader.line_num >= line:
                    return line, None  # the byte is in the header itself
                header = row
            record_line = first
    except (StopIteration, csv.Error):
        pass
    if header is None:
        return line, None
    pos = at
    for _ in range(line - record_line + 1):  # back to the newline before the record
        pos = text.rfind("\n", 0, pos)
        if pos < 0:
            break
    # a fragment ending inside a quoted cell reads as that cell, unclosed quote and all
    cells = next(csv.reader(io.StringIO(text[pos + 1 : at], newline="")), [""])
    index = max(len(cells) - 1, 0)
    if index < len(header) and header[index].strip().lower() in columns:
        return line, header[index]
    return line, None


def _scan_records(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool, bool]:
    """Start offset, end offset and physical line of every non-blank record (RFC 4180 quoting).

    Also returns whether any newline sits inside quotes (pyarrow must then be told so) and
    whether the fast reader cannot be trusted with this file: a bare CR (pyarrow takes it for a
    line end, this scan does not) or quoting that is not strictly RFC 4180 (see
    ``_strictly_quoted``).
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    newlines = _offsets(buf, _NEWLINE)
    crlf = np.count_nonzero(buf[newlines[newlines > 0] - 1] == _CR)
    bare_cr = b"\r" in data and data.count(b"\r") != crlf
    quotes = _offsets(buf, _QUOTE)
    exact_only = bare_cr or not _strictly_quoted(buf, quotes)
    inside = (np.searchsorted(quotes, newlines) & 1).astype(bool)
    ending = np.flatnonzero(~inside)
    bounds = newlines[ending]
    starts = np.concatenate(([0], bounds + 1))
    ends = np.concatenate((bounds, [len(data)]))
    lines = np.concatenate(([1], ending + 2))
    length = ends - starts
    last = buf[np.clip(ends - 1, 0, None)] if len(buf) else np.zeros(len(ends), np.uint8)
    content = length - ((length > 0) & (last == _CR))
    keep = content > 0
    return starts[keep], ends[keep], lines[keep].astype(np.int64), bool(inside.any()), exact_only


def _strictly_quoted(buf: np.ndarray, quotes: np.ndarray) -> bool:
    """Whether every quote opens a field, closes one, or is half of a doubled quote.

    Counting quotes before a newline finds record ends only under that grammar. A quote inside
    an unquoted field (``5" tall``) is literal to pyarrow and to the csv module but flips this
    scan's parity; two such quotes around quoted newlines can keep the row count right while
    every line number between them is off, so such a file goes to the exact reader.
    """
    if len(quotes) % 2:
        return False
    opening, closing = quotes[0::2], quotes[1::2]
    before = buf[np.clip(opening - 1, 0, None)]
    opens_ok = (opening == 0) | (before == _COMMA) | (before == _NEWLINE) | (before == _QUOTE)
    after = buf[np.clip(closing + 1, None, len(buf) - 1)]
    ends = (closing == len(buf) - 1) | (after == _COMMA) | (after == _NEWLINE) | (after == _CR)
    closes_ok = ends | (after == _QUOTE)
    return bool(opens_ok.all() and closes_ok.all())


def _offsets(buf: np.ndarray, byte: int) -> np.ndarray:
    """Positions of ``byte`` in ``buf``, compared a chunk at a time (cache-sized temporaries)."""
    found = [
        np.flatnonzero(buf[start : start + _SCAN_CHUNK] == byte) + start
        for start in range(0, len(buf), _SCAN_CHUNK)
    ]
    return np.concatenate(found) if found else np.empty(0, dtype=np.intp)


def _split_amount(row: list[str], amounts: Sequence[int]) -> int | None:
    """The money column (of ``amounts``) where an unquoted amount was split at its thousands
    separator, if any: its cell is the amount's head, the next cell its tail. Only there: a
    duration of 60 before a revenue of 350.00 is no split."""
    for i in amounts:
        if i + 1 >= len(row):
            continue
        head, tail = row[i].strip(), row[i + 1].strip()
        if _AMOUNT_HEAD.fullmatch(head) and _AMOUNT_TAIL.fullmatch(tail):
            return i
    return None


class CsvExport:
    """One CSV export, decoded and scanned; ``header`` is its first non-blank record.

    Args:
        path: the file; only its name appears in messages.
        encoding: force a codec; None tries UTF-8 (BOM optional), then cp1252.

    Raises:
        InputError: the file is missing, empty, or not text in the expected encoding.
    """

    def __init__(
        self, path: Path, encoding: str | None = None, columns: frozenset[str] = frozenset()
    ) -> None:
        """``columns``: the profile's header names (lower case); an encoding error names the
        header cell above the bad byte only when it is one of them (a file without its header
        row would otherwise have a patient's name read as a column's)."""
        self.name = path.name
        self._columns = columns
        csv.field_size_limit(max(csv.field_size_limit(), _FIELD_LIMIT))  # process-wide, only ever raised
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise _problem(self.name, None, "file not found") from None
        except OSError as exc:  # a folder, no permission, an I/O error: said by its class only
            raise _problem(self.name, None, f"cannot be read ({type(exc).__name__})") from None
        self._data = _decode(raw, self.name, encoding, columns)
        scan = _scan_records(self._data)
        self._starts, ends, self._lines, self._quoted_newlines, self._exact_only = scan
        self.header: list[str] = []
        self.header_line = 1
        # the first record with a non-blank cell: a line of spaces or commas above it is not it
        for index, (start, end) in enumerate(zip(self._starts, ends, strict=True)):
            chunk = self._data[start:end].decode("utf-8")
            try:
                rows = list(csv.reader(io.StringIO(chunk, newline=""), strict=True))
            except csv.Error:
                raise _problem(
                    self.name, int(self._lines[index]), "malformed header (a quote that does not close)"
                ) from None
            header = next((row for row in rows if any(cell.strip() for cell in row)), None)
            if header is not None:
                self.header, self._header_index = header, index
                self.header_line = int(self._lines[index])
                break
        if not self.header:
            raise _problem(self.name, None, "file is empty (no header)")

    def read(self, indices: Sequence[int], amounts: Sequence[int] = ()) -> tuple[list[pa.Array], np.ndarray]:
        """Read the header columns at ``indices`` as strings ("" when blank); ``amounts`` are the
        indices of money columns, where a row with trailing blank cells is checked for an amount
        split at an unquoted thousands separator.

        Returns:
            One string array (possibly chunked) per index, and the physical line where each
            row starts.

        Raises:
            InputError: every row whose field count differs from the header's.
        """
        fast = None if self._exact_only or self._header_index else self._read_fast(indices)
        return fast if fast is not None else self._read_exact(indices, amounts)

    def _read_fast(self, indices: Sequence[int]) -> tuple[list[pa.Array], np.ndarray] | None:
        names = [self.header[i] for i in indices]
        convert = pacsv.ConvertOptions(
            include_columns=names,
            column_types=dict.fromkeys(names, pa.string()),
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        )
        parse = pacsv.ParseOptions(newlines_in_values=self._quoted_newlines)
        try:
            table = pacsv.read_csv(pa.py_buffer(self._data), parse_options=parse, convert_options=convert)
        except (pa.ArrowException, KeyError):
            # pyarrow's message quotes the offending row, so it is never shown; the exact
            # reader below finds the same fault and reports it by line.
            return None
        lines = self._lines[1:]
        if table.num_rows != len(lines) or table.column_names != names:
            return None
        return [table.column(i) for i in range(len(names))], lines

    def _known(self, index: int) -> str | None:
        """The header cell at ``index`` if it is one of the profile's columns, else None: a row
        of data glued onto the header line (``cat header.csv rows.csv`` without a final
        newline) still holds the required columns, and its other cells are a patient's."""
        if index < len(self.header) and self.header[index].strip().lower() in self._columns:
            return self.header[index]
        return None

    def _ragged(self, line: int, found: int) -> RowProblem:
        """A row of the wrong width, named at the column where it parts from the header: the first
        column it does not reach, or the header's last column when it runs past it. The column
        is named only when the profile knows it, else by its 1-based position."""
        width = len(self.header)
        index = found if found < width else width - 1
        where = self._known(index)
        at = f"column {index + 1}"  # by position: the header cell there may be a patient's
        if found < width:
            how = f"the row ends before {'this column' if where is not None else at}"
        else:
            how = (
                f"{found - width} more after {'this' if where is not None else at}, the header's last column"
            )
        return RowProblem(self.name, line, where, f"expected {width} fields, found {found}: {how}")

    def _read_exact(
        self, indices: Sequence[int], amounts: Sequence[int] = ()
    ) -> tuple[list[pa.Array], np.ndarray]:
        width = len(self.header)
        # strict: a quote that does not close where a field ends (`"oops,` with no closing
        # quote) would otherwise swallow the rows after it into one cell, without a word
        reader = csv.reader(io.StringIO(self._data.decode("utf-8"), newline=""), strict=True)
        columns: list[list[str]] = [[] for _ in indices]
        lines: list[int] = []
        problems: list[RowProblem] = []
        trimmed: list[tuple[int, int]] = []  # rows with blank cells past the header's width
        seen_header = False
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error:
                reason = "malformed CSV record (a quoted field does not end where a field can end)"
                problems.append(RowProblem(self.name, start, None, reason))
                break
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if not seen_header and not any(cell.strip() for cell in row):
                continue  # blank-celled lines above the header, as the header search skips them
            if not seen_header:
                seen_header = True
                continue
            if len(row) > width and not any(cell.strip() for cell in row[width:]):
                if (split := _split_amount(row, amounts)) is not None:
                    # a shift even when every row has one: blank trailing cells do not excuse it
                    where = self._known(split)
                    reason = (
                        f"an amount with a thousands separator is not quoted (the row has {len(row)} "
                        f"fields, the header {width}); quote it or export without separators"
                    )
                    problems.append(RowProblem(self.name, start, where, reason))
                    continue
                trimmed.append((start, len(row)))
                row = row[:width]
            if len(row) != width:
                problems.append(self._ragged(start, len(row)))
                continue
            for column, i in zip(columns, indices, strict=True):
                column.append(row[i])
            lines.append(start)
        if trimmed and len(trimmed) < len(lines):
            # trailing empty cells on every row are an export's habit; on some rows only, they
            # can be a shift (an unquoted "$1,200.00" pushing a cell into a blank last column)
            problems += [self._ragged(line, n) for line, n in trimmed]
            problems.sort(key=lambda problem: problem.line or 0)
        if problems:
            raise InputError(problems)
        arrays = [pa.array(column, type=pa.string()) for column in columns]
        return arrays, np.asarray(lines, dtype=np.int64)
