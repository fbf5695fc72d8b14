"""pytest-benchmark benchmarks of blsshm's alltoallv.

The project's pytest configuration passes ``--benchmark-disable``, so in the
normal test run each benchmark body runs once, as a quick smoke test.  To
measure, enable them and keep the figures as JSON::

    pytest tests/bench --benchmark-enable --benchmark-json=bench.json

The single-process benchmarks are ordinary pytest-benchmark timings of one
call.  The multi-rank benchmarks (2 and 4 ranks; 4 oversubscribe a 2-core
machine) time their iterations *inside* the ranks: each
rank times every ``alltoallv`` with ``perf_counter_ns``, and ``extra_info``
(in the JSON) holds the median and p99 over iterations of the per-iteration
maximum over ranks, in µs, and each rank's ``cpu_moves`` and
``futex_sleeps``; pytest-benchmark's own time for them is one whole
``blsshm.spawn`` (process start included), not a latency: do not compare it
across runs (``--benchmark-compare``) as one.  Ratios against
gloo, Open MPI and the memcpy floor in P processes come from
``tools/compare_alltoallv.py``, which runs them side by side.
"""
import os
import time

import numpy as np
import pytest

import blsshm

# Timed iterations per rank in the multi-rank benchmarks: measuring, and smoke test.
ITERS, SMOKE_ITERS = 20_000, 200
SPAWN_TIMEOUT_S = 30  # longest wait inside a collective before it raises


@pytest.fixture
def comm1():
    """A communicator of one rank, in this process."""
    comm = blsshm.Comm.create(1)
    yield comm
    comm.close()


def zero_copy_round(comm, counts, out):
    """One zero-copy iteration: write in place, copy what arrived into ``out``."""
    t = comm.next_post
    with comm.post_views(t, counts, out.dtype) as views:
        for view in views:
            view.fill(t & 0x7F)
    with comm.complete_views(t) as views:
        np.concatenate(views, out=out)


def timed_alltoallv(comm, nbytes, iters):
    """In each rank: ``iters`` timed blocking alltoallv calls after a tenth as many warm-ups.

    Returns their times (ns) and the rank's placement counters over them.
    """
    send = np.full(comm.size * nbytes, comm.rank, np.uint8)
    out = np.empty_like(send)
    counts = [nbytes] * comm.size
    alltoallv = comm.alltoallv
    for _ in range(max(10, iters // 10)):
        alltoallv(send, counts, out=out)
    comm.reset_stats()
    ns = np.empty(iters, np.int64)
    clock = time.perf_counter_ns
    for i in range(iters):
        t0 = clock()
        alltoallv(send, counts, out=out)
        ns[i] = clock() - t0
    assert (out.reshape(comm.size, nbytes) == np.arange(comm.size, dtype=np.uint8)[:, None]).all()
    return ns, {key: comm.stats[key] for key in ("cpu_moves", "futex_sleeps")}


def record_ranks(benchmark, results, nbytes):
    """Put the in-rank figures (per-iteration max over ranks) into ``extra_info``.

    Also each rank's placement counters: the oversubscribed figures depend
    on how the ranks were spread over the cores.
    """
    per_rank_ns = [ns for ns, _ in results]
    worst = np.max(np.stack(per_rank_ns), axis=0) / 1e3
    nprocs = len(per_rank_ns)
    cores = len(os.sched_getaffinity(0))
    benchmark.extra_info.update(
        nprocs=nprocs, bytes_per_pair=nbytes, iterations=int(worst.size),
        cores=cores, oversubscribed=nprocs > cores,
        median_us=float(np.median(worst)), p99_us=float(np.percentile(worst, 99)),
        rank_median_us=[float(np.median(ns)) / 1e3 for ns in per_rank_ns],
        rank_stats=[stats for _, stats in results],
    )


# pytest-benchmark warms up only on PyPy by default; a call's first runs
# fault in the record's pages and the caches.  (A marker's options override
# the command line's --benchmark-warmup for these.)
WARMUP = dict(warmup=True, warmup_iterations=1000)


@pytest.mark.benchmark(group="alltoallv-1-rank", **WARMUP)
def test_alltoallv_1_rank_64b(benchmark, comm1):
    send, out = np.ones(64, np.uint8), np.empty(64, np.uint8)
    benchmark(comm1.alltoallv, send, [64], out=out)


@pytest.mark.benchmark(group="alltoallv-1-rank", **WARMUP)
def test_zero_copy_1_rank_64b(benchmark, comm1):
    benchmark(zero_copy_round, comm1, [64], np.empty(64, np.uint8))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("nbytes", [64, 4096], ids=["64B", "4KiB"])
@pytest.mark.parametrize("nprocs", [2, 4], ids=["2-ranks", "4-ranks"])
def test_alltoallv_ranks(benchmark, nprocs, nbytes):
    """Blocking alltoallv across processes; 4 ranks oversubscribe a 2-core machine."""
    benchmark.group = f"alltoallv-{nprocs}-ranks"
    iters = ITERS if benchmark.enabled else SMOKE_ITERS
    results = benchmark.pedantic(
        blsshm.spawn, args=(timed_alltoallv, nprocs),
        kwargs=dict(args=(nbytes, iters), timeout=SPAWN_TIMEOUT_S), rounds=1, iterations=1)
    record_ranks(benchmark, results, nbytes)


@pytest.mark.benchmark(group="1-mib-in-one-process", **WARMUP)
def test_memcpy_1mib(benchmark):
    """The floor for the next: a plain copy of 1 MiB."""
    src, dst = np.ones(1 << 20, np.uint8), np.empty(1 << 20, np.uint8)
    benchmark(np.copyto, dst, src)


@pytest.mark.benchmark(group="1-mib-in-one-process", **WARMUP)
def test_alltoallv_1_rank_1mib(benchmark, comm1):
    """1 MiB through a one-rank alltoallv: one copy, as the floor, plus the call's overhead."""
    send, out = np.ones(1 << 20, np.uint8), np.empty(1 << 20, np.uint8)
    benchmark(comm1.alltoallv, send, [1 << 20], out=out)
