"""A wait keeps the GIL only briefly: the waiting process's other threads run,
and its signal handlers too (Ctrl-C ends a wait that would never end)."""
import os
import signal
import threading
import time

import numpy as np
import pytest

import blsshm

pytestmark = pytest.mark.timeout(60)

SLOW_RANK_DELAY_S = 0.5


def _wait_while_a_thread_ticks(comm):
    """Rank 1 posts late; rank 0 waits for it while a thread of its own ticks."""
    one = np.ones(2, np.int64)
    comm.alltoallv(one, [1, 1])  # start together
    if comm.rank == 1:
        time.sleep(SLOW_RANK_DELAY_S)
        comm.alltoallv(one, [1, 1])
        return None
    ticks, stop = [], threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.001)

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        start = time.monotonic()
        comm.alltoallv(one, [1, 1])
        end = time.monotonic()
    finally:
        stop.set()
        ticker.join()
    return {"waited_s": end - start, "ticks_during_wait": sum(start < t < end for t in ticks)}


def test_other_threads_run_while_a_rank_waits():
    out = blsshm.spawn(_wait_while_a_thread_ticks, 2, timeout=30)[0]
    assert out["waited_s"] > SLOW_RANK_DELAY_S / 2  # it did wait for the late rank
    # Holding the GIL through the wait would allow no tick at all; a wait that
    # lets go of it after microseconds allows about one per millisecond.
    assert out["ticks_during_wait"] >= 10, out


class _Interrupted(Exception):
    pass


def test_a_signal_handler_runs_in_a_wait_and_its_exception_ends_the_wait():
    """Ctrl-C must stop a rank blocked forever (timeout=None) on a peer that never posts."""
    a = blsshm.Comm.create(2, 0, arena_bytes=1 << 16, timeout=None, spin_us=0)
    b = blsshm.Comm.attach(a.name, 1, timeout=None)
    late_post = []

    def post_late():  # only so that a wait which ignores the signal ends: then the test fails
        late_post.append(True)
        b.post(0, np.zeros(2), [1, 1])

    def interrupt(signum, frame):
        raise _Interrupted()

    previous = signal.signal(signal.SIGINT, interrupt)
    send_sigint = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    rescue = threading.Timer(20, post_late)
    try:
        a.post(0, np.zeros(2), [1, 1])
        send_sigint.start()
        rescue.start()
        with pytest.raises(_Interrupted):
            a.complete(0)
        assert not late_post, "the wait ended only when the peer posted"
        assert a.next_complete == 0  # raised out of the wait, not after it
    finally:
        send_sigint.cancel()
        rescue.cancel()
        signal.signal(signal.SIGINT, previous)
        a.close()
        b.close()



def _late_peer(comm, late_in):
    """Rank 1 is 0.3 s late to post iteration 0 (``late_in="post"``) or to complete it."""
    send = np.zeros(comm.size, np.float32)
    if comm.rank == 1 and late_in == "post":
        time.sleep(0.3)
    comm.post(0, send, [1] * comm.size)  # the first post never waits
    comm.reset_stats()
    if late_in == "post":
        comm.complete(0)  # rank 0 waits here for rank 1's post
    else:
        if comm.rank == 1:
            time.sleep(0.3)
        comm.complete(0)
        comm.post(1, send, [1] * comm.size)  # lag 0: rank 0 waits here for rank 1's complete(0)
    return comm.stats


@pytest.mark.parametrize("late_in", ["post", "complete"])
def test_waits_are_counted_where_they_happen(late_in):
    # Without a spin a wait sleeps at once.  The rank on time waits under
    # complete for a late post, under post for a late complete (lag 0), and
    # counts a sleep; the late rank finds everything ready and counts nothing.
    on_time, late = blsshm.spawn(_late_peer, 2, args=(late_in,), spin_us=0, timeout=30)
    waited = "complete_wait_s" if late_in == "post" else "post_wait_s"
    assert on_time[waited] > 0 and on_time["futex_sleeps"] >= 1, on_time
    if late_in == "post":
        assert on_time["post_wait_s"] == 0, on_time
    assert late["post_wait_s"] == late["complete_wait_s"] == 0 and late["futex_sleeps"] == 0, late
