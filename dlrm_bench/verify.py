"""``--verify``: every prediction recomputed in this process, with no collective.

The check repeats each rank's arithmetic on the same batch slices (so the
MLPs see the same shapes) with the whole model in one process: lookups by
the same kernel into a ``(b, tables, d)`` array, then the bottom MLP, the
interaction and the top MLP.  The distributed run must match bit for bit.
"""
import numpy as np
import torch

from dlrm_bench._pooling import pool_sum
from dlrm_bench.data import load_rank_data
from dlrm_bench.model import Model
from dlrm_bench.sharding import make_plan


def reference_predictions(cfg):
    """``(data_batches, B)`` float32: the predictions of every distinct batch."""
    torch.set_num_threads(1)  # as the ranks: same kernels, same blocking
    plan = make_plan(cfg)
    tables = range(len(cfg.table_rows))
    model = Model.build(cfg, tables)
    data = load_rank_data(cfg, tables, 0, cfg.batch_size, cfg.data_batches)
    d = cfg.sparse_size
    out = np.empty((cfg.data_batches, cfg.batch_size), dtype=np.float32)
    for b in range(cfg.data_batches):
        for lo, hi in plan.slices:
            pooled = np.empty((hi - lo, len(cfg.table_rows), d), dtype=np.float32)
            flat = pooled.reshape(hi - lo, -1)
            for t in tables:
                bags = data.bags[b][t]
                pool_sum(model.tables[t], bags.indices, bags.offsets, lo, flat, t * d)
            dense = np.ascontiguousarray(data.dense[b][lo:hi])
            with torch.inference_mode():
                x = model.dense.bottom(torch.from_numpy(dense))
                out[b, lo:hi] = model.dense.top(x, torch.from_numpy(pooled)).numpy()  # via torch.cat
    return out


def compare(predictions, reference):
    """``(mismatches, max_abs_diff, not_finite)`` of ``(num_batches, B)`` predictions against the reference.

    Iteration ``i`` used distinct batch ``i % data_batches``.  ``not_finite``
    counts NaN or infinite predictions: equal or not, they verify nothing (a
    NaN weight would hide a wrong block behind it), so they fail the check.
    """
    expected = reference[np.arange(len(predictions)) % len(reference)]
    same = predictions.view(np.uint32) == expected.view(np.uint32)
    finite = np.isfinite(predictions)
    diff = np.abs(predictions[finite].astype(np.float64) - expected[finite].astype(np.float64))
    return int((~same).sum()), float(diff.max()) if diff.size else 0.0, int((~finite).sum())
