"""Who owns which table, and which samples of the global batch each rank serves.

Tables are placed by cost with the longest-processing-time rule: tables in
decreasing order of expected lookup cost (mean bag size x embedding width,
the floats a lookup adds up for every sample), each to the rank with the
least cost so far.  That keeps the slowest rank within one table's cost of
the best split, for any number of tables and ranks (a rank may own none).
The global batch is split into contiguous slices, the first ``B % P`` ranks
one sample larger.
"""
from dataclasses import dataclass

from dlrm_bench.data import expected_pooling


@dataclass(frozen=True)
class Plan:
    """The placement of one run: tables per rank and batch slice per rank."""
    tables: tuple        # tables[r]: global table indices owned by rank r, ascending
    slices: tuple        # slices[r]: (lo, hi) samples of every global batch served by rank r
    costs: tuple         # expected cost of every table

    @property
    def nprocs(self):
        return len(self.tables)

    def batch_size(self, rank):
        lo, hi = self.slices[rank]
        return hi - lo

    def load(self, rank):
        return sum(self.costs[t] for t in self.tables[rank])


def table_costs(cfg):
    return tuple(expected_pooling(cfg, t) * cfg.sparse_size for t in range(len(cfg.table_rows)))


def place_tables(costs, nprocs):
    """Longest-processing-time placement; ties go to the lower table and the lower rank."""
    load = [0.0] * nprocs
    owned = [[] for _ in range(nprocs)]
    for t in sorted(range(len(costs)), key=lambda t: (-costs[t], t)):
        r = min(range(nprocs), key=lambda r: (load[r], len(owned[r]), r))
        owned[r].append(t)
        load[r] += costs[t]
    return tuple(tuple(sorted(ts)) for ts in owned)


def split_batch(batch_size, nprocs):
    base, extra = divmod(batch_size, nprocs)
    slices, lo = [], 0
    for r in range(nprocs):
        hi = lo + base + (1 if r < extra else 0)
        slices.append((lo, hi))
        lo = hi
    return tuple(slices)


def make_plan(cfg):
    costs = table_costs(cfg)
    return Plan(place_tables(costs, cfg.nprocs), split_batch(cfg.batch_size, cfg.nprocs), costs)
