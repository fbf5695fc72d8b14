#!/usr/bin/env python
"""How ranks that outnumber the CPUs are spread over them, and what it costs.

With more ranks than CPUs the kernel may start them unevenly, e.g. 3 of 4
on one CPU of two, and keep them so for seconds: waiting ranks spin or
yield, so no CPU is ever idle, and a busy CPU balances only rarely.  blsshm
moves a rank off such a crowded CPU (``_spread.h``, ``Core._spread_out``).

Each run spawns ``--nprocs`` ranks that do ``--iters`` blocking alltoallv of
``--size`` bytes per pair at lag 0, timing every call and noting every 100
calls the CPU each rank is on.  A run prints the median and mean over
iterations of the slowest rank's time (but the first: without a warm-up,
under ``--crowd``, it holds the ranks' start and attach), the fraction of samples in which
the ranks were not spread evenly, and each rank's ``cpu_moves``.
``--crowd`` starts 3 ranks on the first allowed CPU and the rest on the
second, as an unlucky start would; with ``--stay`` they are pinned there,
so neither the kernel nor blsshm can move them: what such a spread costs.

Reproduce the figures in ``_core.pyx`` (4 ranks on 2 cores, 64 B)::

    python tools/spread.py --runs 16                  # as started
    python tools/spread.py --runs 16 --crowd          # 3 + 1 at first, then moved
    python tools/spread.py --runs 4 --crowd --stay    # 3 + 1 throughout
"""
import argparse
import ctypes
import os
import time

import numpy as np

import blsshm

_libc = ctypes.CDLL(None)


def rank_loop(comm, size, iters, crowd, stay):
    cpus_allowed = sorted(os.sched_getaffinity(0))
    if crowd and len(cpus_allowed) >= 2:
        os.sched_setaffinity(0, {cpus_allowed[0] if comm.rank < 3 else cpus_allowed[1]})
        if not stay:
            os.sched_setaffinity(0, set(cpus_allowed))  # start there, free to move
    counts = [size] * comm.size
    send = np.ones(size * comm.size, np.uint8)
    out = np.empty_like(send)
    if not crowd:
        for _ in range(max(5, iters // 10)):
            comm.alltoallv(send, counts, out=out)
    comm.reset_stats()
    ns = np.empty(iters, np.int64)
    where = []
    clock = time.perf_counter_ns
    for i in range(iters):
        if i % 100 == 0:
            where.append(_libc.sched_getcpu())
        t0 = clock()
        comm.alltoallv(send, counts, out=out)
        ns[i] = clock() - t0
    return ns, where, comm.stats["cpu_moves"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nprocs", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="bytes per pair (default 64)")
    parser.add_argument("--iters", type=int, default=1250)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--crowd", action="store_true", help="start 3 ranks on one CPU")
    parser.add_argument("--stay", action="store_true", help="with --crowd: pin them there")
    opts = parser.parse_args()
    if min(opts.nprocs, opts.size, opts.runs) < 1 or opts.iters < 2:
        parser.error("--nprocs, --size and --runs must be at least 1, --iters at least 2")
    allowed = sorted(os.sched_getaffinity(0))
    print(f"{opts.nprocs} ranks on {len(allowed)} CPUs, {opts.size} B per pair, lag 0, "
          f"{opts.iters} iterations per run{', crowded start' if opts.crowd else ''}"
          f"{', pinned' if opts.crowd and opts.stay else ''}")
    for _ in range(opts.runs):
        results = blsshm.spawn(rank_loop, opts.nprocs, args=(opts.size, opts.iters, opts.crowd, opts.stay))
        slowest = np.max([r[0] for r in results], axis=0)[1:] / 1000  # the first waited for the start
        samples = np.array([r[1] for r in results])  # ranks x samples
        per_cpu = np.stack([(samples == c).sum(axis=0) for c in allowed])  # CPUs x samples
        uneven = float(np.mean(per_cpu.max(axis=0) - per_cpu.min(axis=0) > 1))
        print(f"  median {np.median(slowest):6.1f} us  mean {slowest.mean():6.1f} us  "
              f"uneven in {uneven:4.0%} of samples  moves {[r[2] for r in results]}", flush=True)


if __name__ == "__main__":
    main()
