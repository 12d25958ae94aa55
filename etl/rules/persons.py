"""Rule 2: link leads and appointments into persons (transitively) by email, phone, patient ID.

Linking keys are the Google-form email hash (so Gmail dot and plus variants link), the E.164
phone hash, and the PMS ``patient_id``. Rows and keys form a bipartite graph whose connected
components are persons; scipy's sparse connected-components does this in C, which matters at a
million rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def link_persons(appts: pd.DataFrame, leads: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Return an int person label for every appointment row and every lead row.

    Labels are dense (0..n_persons-1) and ordered by first appearance (appointments first, then
    leads, in frame order), so the same input always yields the same labels.
    """
    n_a, n_l = len(appts), len(leads)
    rows: list[np.ndarray] = []
    keys: list[pd.Series] = []
    for frame, offset, cols in (
        (appts, 0, ("em_g", "ph_g", "patient_id")),
        (leads, n_a, ("em_g", "ph_g")),
    ):
        for col in cols:
            if col not in frame:
                continue
            values = frame[col]
            mask = values.notna().to_numpy()
            if not mask.any():
                continue
            rows.append(np.flatnonzero(mask) + offset)
            keys.append(col[:2] + ":" + values[mask].astype(str))
    n_rows = n_a + n_l
    if rows:
        row_idx = np.concatenate(rows)
        codes, _uniques = pd.factorize(pd.concat(keys, ignore_index=True))
        key_idx = codes + n_rows
        n_nodes = n_rows + int(codes.max(initial=-1)) + 1
    else:
        row_idx = key_idx = np.empty(0, dtype=np.int64)
        n_nodes = n_rows
    graph = coo_matrix((np.ones(len(row_idx), dtype=np.int8), (row_idx, key_idx)), shape=(n_nodes, n_nodes))
    _n, labels = connected_components(graph, directed=False)
    row_labels = labels[:n_rows]
    # relabel by first appearance for deterministic, dense person numbers
    _, first = np.unique(row_labels, return_index=True)
    order = np.argsort(first)
    remap = np.empty(labels.max() + 1 if len(labels) else 0, dtype=np.int64)
    remap[np.unique(row_labels)[order]] = np.arange(len(order))
    dense = remap[row_labels]
    return dense[:n_a], dense[n_a:]
