"""Per-distinct-value column work behind ``etl.identifiers.hash_identifiers``.

Why: an export repeats the same email, phone, city or ZIP many times, so each column is
factorized, each distinct raw value normalized once and each distinct normalized value hashed
once. The extract's string columns are arrow arrays, so they are factorized with arrow's
``dictionary_encode`` (no Python object per row), and the hottest normalizers (phones, emails)
also have a bulk form that works on the arrow array of distinct values and gives, value for
value, the answer of the scalar normalizer. The output columns are listed in
``docs/architecture.md`` ("Identifier columns").
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

# a bulk normalizer: the distinct texts of a column in, one answer per text out
Bulk = Callable[[pa.Array], list[str | None]]


class Coded(NamedTuple):
    """A column as one code per row into a list of distinct values (computed once each)."""

    codes: npt.NDArray[np.intp]
    values: list[str | None]


class _Distinct(NamedTuple):
    """A factorized column: ``codes`` index the distinct values, then ``None`` (missing).

    The distinct values are ``texts`` (an arrow string array) when they are all text, else
    ``objects``; ``values`` lists them either way.
    """

    codes: npt.NDArray[np.intp]
    texts: pa.Array | None
    objects: list[object] | None = None

    def values(self) -> list[object]:
        listed = self.texts.to_pylist() if self.texts is not None else self.objects
        return [*(listed or []), None]


def _arrow_strings(column: pd.Series) -> pa.Array | None:
    """The column as one arrow string array, if pandas already stores it that way."""
    dtype = column.dtype
    arrow_backed = (isinstance(dtype, pd.StringDtype) and dtype.storage == "pyarrow") or (
        isinstance(dtype, pd.ArrowDtype)
        and (pa.types.is_string(dtype.pyarrow_dtype) or pa.types.is_large_string(dtype.pyarrow_dtype))
    )
    if not arrow_backed:
        return None
    array = pa.array(column.array)
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def _factorize(column: pd.Series) -> _Distinct:
    """Distinct values of ``column`` (first appearance order) plus ``None`` last, and each row's
    position among them; a missing cell points at the trailing ``None``."""
    strings = _arrow_strings(column)
    if strings is not None:
        encoded = strings.dictionary_encode()
        texts = encoded.dictionary
        codes = pc.fill_null(encoded.indices, len(texts)).to_numpy(zero_copy_only=False)
        return _Distinct(codes.astype(np.intp), texts)
    codes, uniques = pd.factorize(column, use_na_sentinel=True)
    codes = np.where(codes < 0, len(uniques), codes).astype(np.intp)
    if all(isinstance(v, str) for v in uniques):
        try:
            return _Distinct(codes, pa.array(list(uniques), type=pa.large_string()))
        except (pa.ArrowException, UnicodeError):  # a lone surrogate is no UTF-8
            pass
    return _Distinct(codes, None, list(uniques))


def per_value(
    column: pd.Series, normalize: Callable[[object], str | None], bulk: Bulk | None = None
) -> Coded:
    """Normalize each distinct value of ``column`` once.

    ``bulk``, when given, must answer exactly as ``normalize`` does; it is used when every
    distinct value is text (always so for the extract's columns).
    """
    distinct = _factorize(column)
    if bulk is None or distinct.texts is None:
        return _compact(Coded(distinct.codes, [normalize(v) for v in distinct.values()]))
    return _compact(Coded(distinct.codes, [*bulk(distinct.texts), normalize(None)]))


def value_country_pairs(
    column: pd.Series, country: Coded
) -> tuple[npt.NDArray[np.intp], list[tuple[object, str | None]]]:
    """Each row's position among the distinct (raw value, country) pairs, and those pairs."""
    distinct = _factorize(column)
    codes, values = distinct.codes, distinct.values()
    width = len(country.values)
    pair_codes, pairs = pd.factorize(codes.astype(np.int64) * width + country.codes)
    return pair_codes.astype(np.intp), [(values[p // width], country.values[p % width]) for p in pairs]


def mapped_pairs(
    pairs: tuple[npt.NDArray[np.intp], list[tuple[object, str | None]]],
    normalize: Callable[[object, object], str | None],
) -> Coded:
    codes, distinct = pairs
    return _compact(Coded(codes, [normalize(value, country) for value, country in distinct]))


def mapped(coded: Coded, function: Callable[[str | None], str | None]) -> Coded:
    return _compact(Coded(coded.codes, [function(v) for v in coded.values]))


def hashed(coded: Coded) -> Coded:
    """Hash each value; ``coded`` is compact, so no value is hashed twice."""
    sha256 = hashlib.sha256  # the same as sha256_hex, without a call per value
    hashes = [None if v is None else sha256(v.encode("utf-8")).hexdigest() for v in coded.values]
    return Coded(coded.codes, hashes)


def hashed_mapped(coded: Coded, function: Callable[[str | None], str | None], hashes: Coded) -> Coded:
    """``hashed(mapped(coded, function))``, given ``hashes = hashed(coded)``.

    Where ``function`` returns its argument itself (a Google email that is no Gmail address is
    its Meta form), the known hash is reused instead of hashing the same text again.
    """
    sha256 = hashlib.sha256
    out: list[str | None] = []
    for value, known in zip(coded.values, hashes.values, strict=True):
        new = function(value)
        if new is value:
            out.append(known)
        else:
            out.append(None if new is None else sha256(new.encode("utf-8")).hexdigest())
    return _compact(Coded(coded.codes, out))


def _compact(coded: Coded) -> Coded:
    """Merge equal values so that later per-value work runs once per distinct result.

    The distinct results keep their first-appearance order (the order of the output
    categories), then one ``None`` for every unusable value.
    """
    try:
        encoded = pa.array(coded.values, type=pa.large_string()).dictionary_encode()
    except (pa.ArrowException, UnicodeError):  # not all text: merge them the slow way
        remap, distinct = _factorize_objects(coded.values)
        return Coded(remap[coded.codes], [v if isinstance(v, str) else None for v in distinct])
    dictionary = encoded.dictionary
    remap = pc.fill_null(encoded.indices, len(dictionary)).to_numpy(zero_copy_only=False)
    return Coded(remap.astype(np.intp)[coded.codes], [*dictionary.to_pylist(), None])


def _factorize_objects(values: list[str | None]) -> tuple[npt.NDArray[np.intp], list[object]]:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    codes, uniques = pd.factorize(array, use_na_sentinel=True)
    return np.where(codes < 0, len(uniques), codes).astype(np.intp), [*uniques, None]


def to_strings(coded: Coded) -> pd.Categorical:
    """The column as a categorical of its distinct strings (``None`` -> missing).

    A hash column holds one 64-character string per person, repeated on each of their rows;
    as a categorical it costs 4 bytes a row plus each distinct string once, which is what keeps
    a million-row run under its memory target, and Parquet stores it dictionary-encoded.
    """
    values = np.empty(len(coded.values), dtype=object)
    values[:] = coded.values
    present = pd.notna(values)
    remap = np.where(present, np.cumsum(present, dtype=np.int32) - 1, -1).astype(np.int32)
    codes = remap[coded.codes] if len(coded.codes) else np.empty(0, dtype=np.int32)
    categories = pd.Index(values[present], dtype=object)
    return pd.Categorical.from_codes(codes, categories=categories)  # type: ignore[arg-type]
