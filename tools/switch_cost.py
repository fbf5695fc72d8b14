#!/usr/bin/env python
"""What a rank's turn on a shared core costs: the floor under an oversubscribed lag-0 alltoallv.

With more ranks than cores, a lag-0 alltoallv needs every rank to run once
per iteration, so a core with two ranks switches twice per iteration, and
each rank's call then runs "cold": the other process has just used the core,
and its caches, TLB (without PCID every switch between processes empties it)
and branch predictors hold the other's state.  This tool times, for a few
kinds of work, one call alone in a loop ("hot") and the same loop run by two
processes pinned to one core that yield to each other after every call
(each call then follows a switch):

``none``       an empty Python call: the switch and the interpreter's own
               loop;
``numpy``      ``np.add`` of 16 doubles into ``out``: one small NumPy call;
``alltoallv``  a one-rank blsshm ``alltoallv`` of 8 bytes into ``out``: the
               library's own call path, with no peer to wait for.

A "turn" is one call plus one switch to the other process.  Four ranks on two
cores at lag 0 take at least two turns per core per iteration.

Reproduce::

    python tools/switch_cost.py
    python tools/switch_cost.py --rounds 200000 --kinds none alltoallv
"""
import argparse
import contextlib
import mmap
import os
import time

import numpy as np

import blsshm

KINDS = ("none", "numpy", "alltoallv")


def make_call(kind):
    """The call to time, and what to close afterwards (or None)."""
    if kind == "none":
        return (lambda: None), None
    if kind == "numpy":
        a, b, c = np.zeros(16), np.ones(16), np.empty(16)
        return (lambda: np.add(a, b, out=c)), None
    comm = blsshm.Comm.create(1, 0, arena_bytes=1 << 16)
    send, out = np.zeros(8, np.uint8), np.empty(8, np.uint8)
    return (lambda: comm.alltoallv(send, [8], out=out)), comm


def warm_up(call):
    for _ in range(1000):
        call()


def time_calls(call, rounds, switch):
    """Mean ns per round of ``call()`` (then ``sched_yield()`` when ``switch``)."""
    start = time.perf_counter_ns()
    if switch:
        for _ in range(rounds):
            call()
            os.sched_yield()
    else:
        for _ in range(rounds):
            call()
    return (time.perf_counter_ns() - start) / rounds


def hot_ns(kind, rounds):
    """Mean ns of a call of ``kind`` made in a loop in this process alone."""
    call, closer = make_call(kind)
    try:
        warm_up(call)
        return time_calls(call, rounds, False)
    finally:
        if closer is not None:
            closer.close()


PARTNER_BATCH = 64


def _partner(kind, ready_w, go_r, stop):
    """The other process on the core: ready once warm, then turns until ``stop[0]`` is set.

    Turns go in batches of ``PARTNER_BATCH`` between looks at the flag, so
    its turns cost what the timed loop's do (a few turns past the end yield
    to nobody, untimed).
    """
    call, closer = make_call(kind)
    try:
        warm_up(call)
        os.write(ready_w, b"r")
        if os.read(go_r, 1) != b"g":  # end of file: the timing side failed; no turns to take
            return
        while not stop[0]:
            for _ in range(PARTNER_BATCH):
                call()
                os.sched_yield()
    finally:
        if closer is not None:
            closer.close()


def measure(kind, rounds):
    """``(hot ns per call, ns per turn)`` for ``kind``, on the lowest CPU we may use.

    The timed turns begin only once both processes have made and warmed up
    their calls (making a one-rank communicator takes milliseconds: it
    would run in the first turns), and the partner takes turns until the
    timing ends (else the last rounds would yield to nobody).
    """
    mask = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(mask)})
    try:
        hot = hot_ns(kind, rounds)
        with contextlib.ExitStack() as cleanup:
            stop = cleanup.enter_context(mmap.mmap(-1, 1))  # shared with the partner: 0 until the timing ends
            fds = set()  # ours, still open
            cleanup.callback(lambda: [_close(fds, fd) for fd in list(fds)])
            ready_r, ready_w = _pipe(fds)
            go_r, go_w = _pipe(fds)
            pid = os.fork()
            if pid == 0:
                status = 1
                try:
                    _close(fds, ready_r)
                    _close(fds, go_w)
                    _partner(kind, ready_w, go_r, stop)
                    status = 0
                finally:
                    os._exit(status)
            partner = {}
            # Last in, first out: the partner is told to stop, its "go" pipe
            # closes (waiting for "go", it reads end of file), it is reaped.
            cleanup.callback(lambda: partner.setdefault("status", os.waitpid(pid, 0)[1]))
            cleanup.callback(_close, fds, go_w)
            cleanup.callback(stop.__setitem__, 0, 1)
            _close(fds, ready_w)
            _close(fds, go_r)
            closer = None
            try:
                call, closer = make_call(kind)
                warm_up(call)
                try:  # end of file, or a broken pipe: it exited before its first turn
                    started = os.read(ready_r, 1) == b"r" and os.write(go_w, b"g") == 1
                except BrokenPipeError:
                    started = False
                if not started:
                    raise RuntimeError(f"the partner process for {kind!r} failed before its first turn")
                per_round = time_calls(call, rounds, True)  # each round holds one turn of each process
            finally:
                if closer is not None:
                    closer.close()
        if partner["status"] != 0:
            raise RuntimeError(f"the partner process for {kind!r} failed (wait status {partner['status']})")
    finally:
        os.sched_setaffinity(0, mask)
    return hot, per_round / 2


def _pipe(fds):
    r, w = os.pipe()
    fds.update((r, w))
    return r, w


def _close(fds, fd):
    """Close ``fd`` if it is still one of ``fds`` (a number closed twice could name another file by then)."""
    if fd in fds:
        fds.discard(fd)
        os.close(fd)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="See the module docstring: python -m pydoc tools/switch_cost.py")
    parser.add_argument("--rounds", type=int, default=100_000, help="calls per measurement (default 100000)")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                        help="which calls to time (default: all)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    print("two processes on one core, yielding to each other after every call; ns:")
    print(f"  {'call':10s} {'hot call':>9s} {'turn':>7s} {'turn - hot':>11s}")
    for kind in args.kinds:
        hot, turn = measure(kind, args.rounds)
        print(f"  {kind:10s} {hot:9.0f} {turn:7.0f} {turn - hot:11.0f}")


if __name__ == "__main__":
    main()
