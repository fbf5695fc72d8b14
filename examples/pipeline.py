"""A bounded-lag pipeline that absorbs random delays.

    python -m blsshm.run -n 4 --lag 4 examples/pipeline.py --iters 1000

Each rank computes for ``--compute-ms`` per iteration (a busy loop), is
delayed now and then (``--delay-prob``, ``--delay-ms``: a sleep, like a page
fault or a preemption), then exchanges irregular blocks with every rank.  With
a synchronous alltoallv (``--lag 0``) the run costs the sum over iterations of
the slowest rank; with lag L, fast ranks post up to L + 1 iterations while the
slowest is stalled (they run up to L iterations ahead of it), so
a delay is absorbed when it is shorter than about L iterations of work.  Rank 0
prints both bounds (they assume a core per rank: with more ranks than cores
it also prints what the compute alone takes on the cores there are) and the
time taken.
"""
import argparse
import os
import time

import numpy as np

import blsshm


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--compute-ms", type=float, default=1.0, help="work per iteration")
    p.add_argument("--delay-prob", type=float, default=0.1, help="chance of a delay per iteration")
    p.add_argument("--delay-ms", type=float, default=2.0, help="length of a delay")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    with blsshm.init() as comm:
        P, L, me = comm.size, comm.lag, comm.rank
        # Every rank draws every rank's delays from one seed, so each can
        # compute the bounds without another collective.
        delays = np.where(np.random.default_rng(args.seed).random((args.iters, P)) < args.delay_prob,
                          args.delay_ms / 1e3, 0.0)
        cost = delays + args.compute_ms / 1e3  # what each rank spends per iteration
        rng = np.random.default_rng([args.seed, me])
        # Iteration 0, untimed and empty, waits for every rank to start and
        # attach, so the clock (and the wait counters) hold the run alone.
        comm.alltoallv(np.empty(0, np.float32), [0] * P)
        comm.reset_stats()
        start = time.perf_counter()
        for t in range(args.iters):
            it = t + 1  # the communicator's iteration number
            busy_until = time.perf_counter() + args.compute_ms / 1e3
            while time.perf_counter() < busy_until:
                pass
            if delays[t, me]:
                time.sleep(delays[t, me])  # sleep(0) alone costs ~90 us on some VMs
            counts = rng.integers(0, 256, size=P)          # irregular, per iteration
            comm.post(it, np.full(counts.sum(), it, np.float32), counts)
            # Complete whatever has arrived; wait only when L iterations are
            # outstanding.  Holding peers' buffers no longer than needed is
            # what lets a fast rank post up to L + 1 iterations past a stalled one.
            while comm.next_complete <= it and (it - comm.next_complete >= L
                                                or comm.arrived(comm.next_complete)):
                u = comm.next_complete
                recv, _ = comm.complete(u)
                assert (recv == u).all()
        while comm.next_complete <= args.iters:
            comm.complete(comm.next_complete)
        elapsed = time.perf_counter() - start
        if me == 0:
            print(f"{P} ranks, lag {L}, {args.iters} iterations: {elapsed:.3f} s")
            print(f"  synchronous bound (sum over iterations of the slowest rank): {cost.max(axis=1).sum():.3f} s")
            print(f"  bounded-lag ideal (the largest per-rank sum): {cost.sum(axis=0).max():.3f} s")
            cores = len(os.sched_getaffinity(0))
            if P > cores:  # busy loops share the cores; the delays (sleeps) do not
                print(f"  {P} ranks share {cores} cores: their compute alone takes "
                      f"{P * args.iters * args.compute_ms / 1e3 / cores:.3f} s")
            print(f"  rank 0 waited {comm.stats['post_wait_s'] + comm.stats['complete_wait_s']:.3f} s")


if __name__ == "__main__":
    main()
