"""Run ranks in child processes for tests that must watch them from outside.

``blsshm.spawn`` is what users call; this harness lets a test kill a rank,
time what the others see and collect every outcome, failures included.
"""
import multiprocessing
import queue
import time
import traceback

import numpy as np

from blsshm import Comm, segment

# Offsets that mirror blsshm/_layout.h: a header line and the abort line,
# then 3 lines per rank, the first holding its ``published`` count.
LINE = 128
_RANKS_AT = 2 * LINE


def process_state(pid):
    """``pid``'s state letter from /proc ('T' stopped, 'Z' a zombie), or None once it is reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):  # reaped before the open, or between it and the read
        return None


def running(pid):
    """Whether ``pid`` runs (a zombie waiting for its reaper, or one dying, does not)."""
    return process_state(pid) not in ("Z", "X", None)


def wait_until_published(comm, rank, count):
    """Sleep-poll until ``rank`` has posted ``count`` iterations, seen from ``comm``.

    A test whose peer closes or dies uses this to order that after a post:
    a post made after a peer left raises for that reason itself.
    """
    published = np.frombuffer(comm._mapping, np.uint64, 1, _RANKS_AT + 3 * LINE * rank)
    while published[0] < count:
        time.sleep(0.001)


def wait_until_a_rank_sleeps_on(comm, rank, counter):
    """Sleep-poll until some rank sleeps (on its futex) waiting for ``rank``'s ``counter``
    (``"published"`` or ``"completed"``): a test then knows that rank is waiting,
    without guessing how long it takes to get there."""
    line = {"published": 0, "completed": 1}[counter]
    sleepers = np.frombuffer(comm._mapping, np.uint32, 1, _RANKS_AT + 3 * LINE * rank + line * LINE + 8)
    while sleepers[0] == 0:
        time.sleep(0.001)


def wait_until_a_rank_closed(comm):
    """Sleep-poll until some rank has closed the communicator (the count beside the abort word)."""
    closes = np.frombuffer(comm._mapping, np.uint32, 1, LINE + 4)
    while closes[0] == 0:
        time.sleep(0.001)


def _rank_main(target, name, rank, args, results, comm_kwargs, setup):
    try:
        if setup is not None:
            setup(rank)
        with Comm.attach(name, rank, **comm_kwargs) as comm:
            value = target(comm, *args)
        results.put((rank, "ok", value))
    except BaseException as exc:
        results.put((rank, "error", (type(exc).__name__, str(exc), time.monotonic(),
                                     traceback.format_exc(), getattr(exc, "lost_rank", None))))


class Ranks:
    """Start ``size`` ranks running ``target(comm, *args)``; always reaps and unlinks."""

    def __init__(self, target, size, *, lag=0, arena_bytes=1 << 20, args=(), setup=None, **comm_kwargs):
        """``setup(rank)``, if given, runs in each rank's process before it attaches."""
        self.ctx = multiprocessing.get_context("fork")
        self.name = segment.create(size, lag, arena_bytes)
        self.results = self.ctx.Queue()
        self.procs = [
            self.ctx.Process(target=_rank_main, daemon=True,
                             args=(target, self.name, r, args, self.results, comm_kwargs, setup))
            for r in range(size)
        ]
        for p in self.procs:
            p.start()

    def collect(self, expected, timeout=60.0):
        """``{rank: (status, value)}`` for ``expected`` ranks, waiting up to ``timeout`` s."""
        out = {}
        deadline = time.monotonic() + timeout
        while len(out) < expected:
            try:
                rank, status, value = self.results.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            out[rank] = (status, value)
        return out

    def close(self):
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join()
        self.results.close()
        self.results.join_thread()
        segment.unlink(self.name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
