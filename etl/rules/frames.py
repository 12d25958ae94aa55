"""Small vectorised frame helpers shared by the rule modules."""

from __future__ import annotations

import numpy as np
import pandas as pd


def ordered_lists(frame: pd.DataFrame, key: str, column: str, cap: int, index: pd.Index) -> list[list[str]]:
    """Per key in ``index``: the distinct non-null values of ``column`` in frame order, at most ``cap``.

    ``frame`` must already be sorted by key and priority. A pandas ``groupby().agg(list)`` runs
    Python per group (seconds at a million rows); ranking and pivoting stays in C.
    """
    vals = frame[[key, column]].dropna().drop_duplicates()
    vals = vals[vals.groupby(key, sort=False).cumcount() < cap]
    if vals.empty:
        return [[] for _ in range(len(index))]
    rank = vals.groupby(key, sort=False).cumcount().to_numpy()
    wide = pd.DataFrame({"k": vals[key].to_numpy(), "r": rank, "v": vals[column].to_numpy()})
    table = wide.pivot(index="k", columns="r", values="v").reindex(index)
    columns = [table[c].to_numpy(dtype=object) for c in table.columns]
    return [[v for v in row if isinstance(v, str)] for row in zip(*columns, strict=True)]


def first_per_key(keys: np.ndarray, values: pd.Series) -> pd.Series:
    """The first value per key (``keys`` sorted so that the wanted one comes first)."""
    frame = pd.DataFrame({"k": keys, "v": values.to_numpy()})
    return frame.drop_duplicates("k").set_index("k")["v"]
