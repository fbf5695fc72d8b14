"""Inference batches: dense features and embedding-bag lookups, generated or read.

The data are ``cfg.data_batches`` distinct global batches of ``B`` samples,
which the iterations cycle through.  For each table, a batch's lookups are
``B`` bags in CSR form: ``indices`` and
``offsets`` (``B + 1`` entries, bag ``i`` is ``indices[offsets[i]:offsets[i+1]]``).

Everything is drawn from the seed per (table, batch) and per batch, so a
rank generates only the tables it owns and the dense rows of its own slice,
and any number of ranks sees the same data as one process does.

``random`` follows the reference DLRM generator's pooling rule: a bag's size
is ``round(max(1, r * min(rows, k)))`` for uniform ``r`` (or ``k`` with
``--num-indices-per-lookup-fixed``), its rows ``round(r * (rows - 1))`` for
uniform ``r``, duplicates removed and sorted (``np.unique``).  ``zipf`` keeps
the bag sizes and draws rows with probability proportional to
``1 / (row + 1) ** alpha`` (row 0 the most popular).  ``--pooling-skew s``
scales table ``t``'s ``k`` by ``exp(s * z_t)`` and ``--pooling-drift s``
each (table, batch) by ``exp(s * z_tb)`` (``z`` standard normal), which makes
table access irregular across tables and over iterations; a scaled cap stops
at the table's rows.
"""
import functools
import math

import numpy as np

DENSE_STREAM, BAGS_STREAM, SKEW_STREAM = 11, 12, 13


class Bags:
    """One table's lookups for one global batch (CSR)."""
    __slots__ = ("indices", "offsets")

    def __init__(self, indices, offsets):
        self.indices = indices  # int64, the rows of every bag, bag after bag
        self.offsets = offsets  # int64, B + 1 entries

    @property
    def sizes(self):
        return np.diff(self.offsets)


def _table_log_scale(cfg, table):
    """``skew * z_t``: the log of how much table ``table``'s bags are scaled (0 without skew)."""
    if cfg.pooling_skew == 0:
        return 0.0
    return cfg.pooling_skew * float(np.random.default_rng([cfg.seed, SKEW_STREAM, table]).standard_normal())


def _bag_cap(cfg, rows, log_scale):
    """The cap ``k`` of a bag's size: ``K * exp(log_scale)``, limited as the table allows.

    Unscaled, it is the reference rule's: ``min(rows, K)`` for uniform sizes,
    ``K`` for fixed ones (drawn with replacement, then deduplicated).  A
    scaled cap stops at the table's rows (or ``K``, if larger, for fixed
    sizes), worked in logs: a large skew or drift overflowed ``exp``, and
    fixed sizes had no bound at all.
    """
    K = cfg.indices_per_lookup
    limit = max(rows, K) if cfg.indices_per_lookup_fixed else rows
    if log_scale == 0:
        return float(min(limit, K))
    log_k = math.log(K) + log_scale
    return math.exp(log_k) if log_k < math.log(limit) else float(limit)  # NaN (inf - inf) too


def expected_pooling(cfg, table):
    """About the mean bag size of a table before duplicates are removed: what a lookup costs.

    Only table placement uses it, and only to compare tables, so the rough
    ``(cap + 1) / 2`` of the uniform rule is good enough.
    """
    rows = cfg.table_rows[table]
    if cfg.data_generation == "dataset":
        return 1.0
    # The mean of exp(drift * z) is exp(drift^2 / 2).
    k = _bag_cap(cfg, rows, _table_log_scale(cfg, table) + cfg.pooling_drift * cfg.pooling_drift / 2)
    if cfg.indices_per_lookup_fixed:
        return max(1.0, k)
    return max(1.0, (k + 1) / 2)


@functools.lru_cache(maxsize=None)
def _zipf_cdf(rows, alpha):
    """Cumulative zipf probabilities of a table's rows (computed once per size and alpha)."""
    cdf = np.cumsum(1.0 / np.arange(1, rows + 1, dtype=np.float64) ** alpha)
    return cdf / cdf[-1]


def make_bags(cfg, table, batch):
    """Table ``table``'s bags for global batch ``batch`` (random or zipf)."""
    rows, n = cfg.table_rows[table], cfg.batch_size
    rng = np.random.default_rng([cfg.seed, BAGS_STREAM, table, batch])
    log_scale = _table_log_scale(cfg, table)
    if cfg.pooling_drift:
        log_scale += cfg.pooling_drift * rng.standard_normal()
    k = _bag_cap(cfg, rows, log_scale)
    if cfg.indices_per_lookup_fixed:
        sizes = np.full(n, max(1, int(round(k))), dtype=np.int64)
    else:
        sizes = np.round(np.maximum(1.0, rng.random(n) * k)).astype(np.int64)
    u = rng.random(int(sizes.sum()))
    if cfg.data_generation == "zipf":
        rows_drawn = np.minimum(np.searchsorted(_zipf_cdf(rows, cfg.zipf_alpha), u), rows - 1)
    else:
        rows_drawn = np.round(u * (rows - 1)).astype(np.int64)
    return _unique_per_bag(rows_drawn.astype(np.int64), sizes)


def _unique_per_bag(values, sizes):
    """``np.unique`` within each bag, vectorised: sorted rows, no duplicates."""
    n = len(sizes)
    bag = np.repeat(np.arange(n, dtype=np.int64), sizes)
    order = np.lexsort((values, bag))
    values, bag = values[order], bag[order]
    keep = np.ones(len(values), dtype=bool)
    keep[1:] = (values[1:] != values[:-1]) | (bag[1:] != bag[:-1])
    counts = np.bincount(bag[keep], minlength=n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return Bags(np.ascontiguousarray(values[keep]), offsets)


def make_dense(cfg, batch):
    """Dense features of every sample of global batch ``batch``: uniform in [0, 1), float32."""
    rng = np.random.default_rng([cfg.seed, DENSE_STREAM, batch])
    return rng.random((cfg.batch_size, cfg.mlp_bot[0])).astype(np.float32)


class RankData:
    """What one rank needs: bags of its tables for whole batches, dense rows of its slice."""

    def __init__(self, bags, dense, num_batches):
        self.bags = bags        # bags[batch][table] -> Bags, for the owned tables
        self.dense = dense      # dense[batch] -> (slice, bottom_in) float32
        self.num_batches = num_batches


def load_rank_data(cfg, tables, lo, hi, num_batches, beat=None):
    """Bags of ``tables`` and dense rows ``lo:hi`` of every batch, generated or read.

    ``beat`` (if given) is called now and then while a data file is read or
    the batches are generated (minutes for many large ones): a sign of progress.
    """
    if cfg.data_generation == "dataset":
        from dlrm_bench import criteo
        return criteo.rank_data(cfg, tables, lo, hi, num_batches, beat)
    bags, dense = [], []
    for b in range(num_batches):
        bags.append({t: make_bags(cfg, t, b) for t in tables})
        dense.append(np.ascontiguousarray(make_dense(cfg, b)[lo:hi]))
        if beat is not None:
            beat()
    return RankData(bags, dense, num_batches)
