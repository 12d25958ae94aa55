"""Per-distinct-value column work behind ``etl.identifiers.hash_identifiers``.

Why: an export repeats the same email, phone, city or ZIP many times, so each column is
factorized, each distinct raw value normalized once and each distinct normalized value hashed
once. The output columns are listed in ``docs/architecture.md`` ("Identifier columns").
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import pandas as pd


class Coded(NamedTuple):
    """A column as one code per row into a list of distinct values (computed once each)."""

    codes: npt.NDArray[np.intp]
    values: list[str | None]


def _factorize(column: pd.Series) -> tuple[npt.NDArray[np.intp], list[object]]:
    """Distinct values of ``column`` plus ``None`` last, and each row's position among them."""
    codes, uniques = pd.factorize(column, use_na_sentinel=True)
    # a missing cell (code -1) points at the trailing None
    return np.where(codes < 0, len(uniques), codes).astype(np.intp), [*uniques, None]


def per_value(column: pd.Series, normalize: Callable[[object], str | None]) -> Coded:
    """Normalize each distinct value of ``column`` once."""
    codes, values = _factorize(column)
    return _compact(Coded(codes, [normalize(v) for v in values]))


def value_country_pairs(
    column: pd.Series, country: Coded
) -> tuple[npt.NDArray[np.intp], list[tuple[object, str | None]]]:
    """Each row's position among the distinct (raw value, country) pairs, and those pairs."""
    codes, values = _factorize(column)
    width = len(country.values)
    pair_codes, pairs = pd.factorize(codes.astype(np.int64) * width + country.codes)
    distinct = [(values[p // width], country.values[p % width]) for p in pairs]
    return pair_codes.astype(np.intp), distinct


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


def _compact(coded: Coded) -> Coded:
    """Merge equal values so that later per-value work runs once per distinct result."""
    remap, distinct = _factorize(pd.Series(_object_array(coded.values), dtype=object))
    return Coded(remap[coded.codes], [v if isinstance(v, str) else None for v in distinct])


def _object_array(values: list[str | None]) -> npt.NDArray[np.object_]:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def to_strings(coded: Coded) -> pd.Categorical:
    """The column as a categorical of its distinct strings (``None`` -> missing).

    A hash column holds one 64-character string per person, repeated on each of their rows;
    as a categorical it costs 4 bytes a row plus each distinct string once, which is what keeps
    a million-row run under its memory target, and Parquet stores it dictionary-encoded.
    """
    categories: list[str] = []
    remap = np.full(len(coded.values), -1, dtype=np.int32)
    for index, value in enumerate(coded.values):
        if value is not None:
            remap[index] = len(categories)
            categories.append(value)
    codes = remap[coded.codes] if len(coded.codes) else np.empty(0, dtype=np.int32)
    return pd.Categorical.from_codes(codes, categories=pd.Index(categories, dtype=object))  # type: ignore[arg-type]
