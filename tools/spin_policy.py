#!/usr/bin/env python
"""The measurements behind blsshm's waiting policy (``blsshm.comm.SPIN_US``).

A wait spins (pausing, and yielding the core every 2 us or, while a rank it
waits for shares its core, after every check) for up to ``spin_us`` before
it sleeps on a futex.  Three experiments, each run for several spin budgets
side by side in one invocation:

``wake``      one rank sleeps 2 ms, then posts; the other measures from the
              post to its own return: the cost of waking a sleeping process
              (what a too-short spin pays on every wait).
``oversub``   8 ranks on the machine's cores run 2000 blocking alltoallv of
              64 B per pair: does spinning help or hurt when ranks share cores?
``compute``   4 ranks, each busy 0.5 ms per iteration plus 2 ms in 10% of
              iterations, at lag 0 and 4: do spinning waiters starve a late
              rank that computes on their core?

``oversub`` and ``compute`` time each rank's loop after a warm-up that
ends with the ranks aligned, and print the slowest rank's time.

Reproduce::

    python tools/spin_policy.py                 # all three, spins 2 and 1000 us
    python tools/spin_policy.py wake --spins 2 50 1000
"""
import argparse
import os
import time

import numpy as np

import blsshm
from blsshm.comm import _check_spin_us


def busy(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def wake_rank(comm, iters, spin_us):
    comm.spin_ns = int(spin_us * 1000)
    lat = []
    for _ in range(iters):
        if comm.rank == 0:
            time.sleep(0.002)
            stamp = np.full(2, time.perf_counter_ns(), np.int64)
            comm.alltoallv(stamp, [1, 1])
        else:
            recv, _ = comm.alltoallv(np.zeros(2, np.int64), [1, 1])
            lat.append(time.perf_counter_ns() - recv[0])
    return lat


def warm_up(comm, calls=50):
    """A few alltoallv, the last aligning the ranks: the time that follows holds no start-up.

    Without them a rank's time held waiting for the last rank to start and
    attach, several ms, more than the spin budgets change.
    """
    send = np.zeros(comm.size, np.float32)
    for _ in range(calls):
        comm.alltoallv(send, [1] * comm.size)
    comm.reset_stats()


def oversub_rank(comm, iters, spin_us):
    comm.spin_ns = int(spin_us * 1000)
    send = np.zeros(comm.size * 16, np.float32)
    warm_up(comm)
    t0 = time.perf_counter()
    for _ in range(iters):
        comm.alltoallv(send, [16] * comm.size)
    return time.perf_counter() - t0, comm.stats["futex_sleeps"]


COMPUTE_S, COMPUTE_LATE_S, COMPUTE_LATE_SHARE = 0.0005, 0.002, 0.1  # compute: each iteration's work


def compute_rank(comm, iters, spin_us):
    comm.spin_ns = int(spin_us * 1000)
    rng = np.random.default_rng(comm.rank)
    send = np.zeros(comm.size * 256, np.float32)
    counts = [256] * comm.size
    L = comm.lag
    warm_up(comm)
    first = comm.next_post
    t0 = time.perf_counter()
    for t in range(first, first + iters):
        busy(COMPUTE_S + (COMPUTE_LATE_S if rng.random() < COMPUTE_LATE_SHARE else 0.0))
        comm.post(t, send, counts)
        if t - first >= L:
            comm.complete(t - L)
    for t in range(max(first, first + iters - L), first + iters):
        comm.complete(t)
    return time.perf_counter() - t0, comm.stats["futex_sleeps"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("experiments", nargs="*", metavar="{wake,oversub,compute}",
                   help="which experiments (default: all)")
    p.add_argument("--spins", type=float, nargs="+", default=[2.0, 1000.0],
                   help="spin budgets to compare, in microseconds")
    opts = p.parse_args()
    for spin in opts.spins:
        try:  # the library's own check, as spawn(spin_us=) would make it
            _check_spin_us(spin)
        except ValueError as exc:
            p.error(f"--spins: {exc}")
    unknown = set(opts.experiments) - {"wake", "oversub", "compute"}
    if unknown:
        p.error(f"unknown experiment(s): {sorted(unknown)}")
    opts.experiments = opts.experiments or ["wake", "oversub", "compute"]
    cores = len(os.sched_getaffinity(0))
    print(f"{cores} cores")
    for exp in opts.experiments:
        for spin in opts.spins:
            if exp == "wake":
                lat = np.array(blsshm.spawn(wake_rank, 2, args=(200, spin))[1]) / 1e3
                print(f"wake     spin {spin:6.0f} us: post-to-return median {np.median(lat):7.1f} us, "
                      f"p90 {np.percentile(lat, 90):7.1f} us")
            elif exp == "oversub":
                res = blsshm.spawn(oversub_rank, 8, args=(2000, spin))
                print(f"oversub  spin {spin:6.0f} us: 8 ranks, 2000 alltoallv in "
                      f"{max(r[0] for r in res):.3f} s, futex sleeps {sum(r[1] for r in res)}")
            else:
                ranks, iters = 4, 400
                work = ranks * iters * (COMPUTE_S + COMPUTE_LATE_SHARE * COMPUTE_LATE_S) / min(ranks, cores)
                for lag in (0, 4):
                    res = blsshm.spawn(compute_rank, ranks, lag=lag, args=(iters, spin))
                    print(f"compute  spin {spin:6.0f} us, lag {lag}: {ranks} ranks, {iters} iterations in "
                          f"{max(r[0] for r in res):.3f} s (CPU work per core {work:.2f} s), "
                          f"futex sleeps {sum(r[1] for r in res)}")


if __name__ == "__main__":
    main()
