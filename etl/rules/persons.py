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
    n_rows = n_a + n_l
    row_parts: list[np.ndarray] = []
    key_parts: list[np.ndarray] = []
    offset = 0
    for column, frames in (("em_g", (appts, leads)), ("ph_g", (appts, leads)), ("patient_id", (appts,))):
        # one factorize per key kind, codes shifted past the previous kinds: no key strings built
        values = [
            np.asarray(f[column], dtype=object) if column in f else np.full(len(f), None, object)
            for f in frames
        ]
        if len(frames) == 1:
            values.append(np.full(n_l, None, dtype=object))
        codes, uniques = pd.factorize(np.concatenate(values), use_na_sentinel=True)
        present = codes >= 0
        row_parts.append(np.flatnonzero(present))
        key_parts.append(codes[present] + offset)
        offset += len(uniques)
    row_idx = np.concatenate(row_parts) if row_parts else np.empty(0, dtype=np.int64)
    key_idx = (np.concatenate(key_parts) if key_parts else np.empty(0, dtype=np.int64)) + n_rows
    n_nodes = n_rows + offset
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
