"""A wait keeps the GIL only briefly: the waiting process's other threads run,
and its signal handlers too (Ctrl-C ends a wait that would never end)."""
import os
import signal
import threading
import time

import numpy as np
import pytest

import blsshm
from blsshm import _core
from harness import LINE, Ranks, wait_until_a_rank_sleeps_on, wait_until_published

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
        rescue.start()  # first: the SIGINT must find us inside pytest.raises, however slow a start
        send_sigint.start()
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
    """Rank 1 is late to post iteration 0 (``late_in="post"``) or to complete it:
    it goes on only once rank 0 sleeps waiting for it."""
    send = np.zeros(comm.size, np.float32)
    if comm.rank == 1 and late_in == "post":
        wait_until_a_rank_sleeps_on(comm, 1, "published")
    comm.post(0, send, [1] * comm.size)  # the first post never waits
    comm.reset_stats()
    if late_in == "post":
        comm.complete(0)  # rank 0 waits here for rank 1's post
    else:
        if comm.rank == 1:
            wait_until_a_rank_sleeps_on(comm, 1, "completed")
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


# Where rank 0's wait registers as a sleeper on rank 1's posts: the offsets
# mirror blsshm/_layout.h (header and abort lines, then 3 lines per rank).
_PUBLISHED_SLEEPERS_OF_RANK_1 = 2 * LINE + 3 * LINE + 8


def _wake_in_the_sleep_window(comm, waker, how):
    """Rank 0 sleeps waiting for rank 1's post; ``waker`` aborts or closes
    once rank 0 has registered as a sleeper, inside the widened window between
    rank 0's last look and its futex call."""
    # On CPUs of their own, so the waker acts within microseconds of seeing
    # rank 0 register, well inside the window (on rank 0's CPU it would run
    # only once rank 0 is asleep, and a plain wake would do).
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[0]} if comm.rank == 0 else {cpus[1]})
    if comm.rank == 0:
        comm.spin_ns = 0
        comm.slice_ns = 3600 * 10**9  # a missed wake would sleep for an hour
        comm.sleep_gap_ns = 50_000_000
        comm.post(0, np.zeros(comm.size), [1] * comm.size)
        try:
            comm.complete(0)
        except blsshm.BlsError as exc:
            return type(exc).__name__, getattr(exc, "lost_rank", None)
        return "completed", None
    if comm.rank == waker:
        sleepers = np.frombuffer(comm._mapping, np.uint32, 1, _PUBLISHED_SLEEPERS_OF_RANK_1)
        while sleepers[0] == 0:
            pass
        if how == "abort":
            comm.abort("woken")
        else:
            comm.close()
        return None
    while comm._abort_info() is None:  # the other rank stays until rank 0 has seen it
        time.sleep(0.001)
    return None


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
@pytest.mark.skipif(not _core.futex_waitv_works(),
                    reason="needs futex_waitv (Linux 5.16+); without it such a wake waits for the slice")
@pytest.mark.parametrize("waker, how, expected", [
    (1, "abort", ("CommAborted", None)),
    (1, "close", ("PeerLostError", 1)),
    (2, "close", ("PeerLostError", 2)),  # a rank other than the one slept on
])
def test_an_abort_or_close_racing_a_sleep_still_wakes_it(waker, how, expected):
    with Ranks(_wake_in_the_sleep_window, 3, args=(waker, how), timeout=None) as ranks:
        out = ranks.collect(3, timeout=20)
    assert 0 in out, f"rank 0 still sleeps: the {how} by rank {waker} did not wake it ({out})"
    assert out[0] == ("ok", expected)


_CLOSES = LINE + 4  # the count of closed ranks, beside the abort word


def _peer_closes_while_we_spin(comm, when):
    """Rank 0 spins (for up to an hour) for rank 1's post; rank 1 closes
    before the wait begins or during it."""
    if comm.rank == 1:
        # After rank 0's post: a post after the close would itself raise.
        wait_until_published(comm, 0, 1)
        if when == "during":
            time.sleep(0.2)
        comm.close()
        return None
    comm.spin_ns = 3600 * 10**9
    comm.post(0, np.zeros(2), [1, 1])
    if when == "before":
        closes = np.frombuffer(comm._mapping, np.uint32, 1, _CLOSES)
        while closes[0] == 0:
            time.sleep(0.001)
    try:
        comm.complete(0)
    except blsshm.PeerLostError as exc:
        return exc.lost_rank, comm.stats["futex_sleeps"]
    return "completed", None


@pytest.mark.parametrize("when", ["before", "during"])
def test_a_spinning_wait_notices_a_peer_that_closes(when):
    with Ranks(_peer_closes_while_we_spin, 2, args=(when,), timeout=None) as ranks:
        out = ranks.collect(2, timeout=20)
    assert 0 in out, f"rank 0 still spins: it did not notice rank 1 close ({out})"
    assert out[0] == ("ok", (1, 0))  # lost rank 1, noticed without sleeping


# Where rank r's fence_free flag lies: the offsets mirror blsshm/_layout.h
# (header and abort lines, then 3 lines per rank; after published and its sleepers).
def _fence_free_flags(comm):
    return [int(np.frombuffer(comm._mapping, np.uint32, 1, 2 * LINE + 3 * LINE * r + 12)[0])
            for r in range(comm.size)]


def _allow_fence_free_in(ranks):
    def setup(rank):
        _core._allow_fence_free(rank in ranks)
    return setup


def _sleep_in_every_wait(comm, iterations):
    """Every wait sleeps at once, and a missed wake would sleep for an hour."""
    comm.spin_ns = 0
    comm.slice_ns = 3600 * 10**9
    size, rank = comm.size, comm.rank
    for t in range(iterations):
        counts = [(rank + q + t) % 3 for q in range(size)]
        send = np.concatenate([np.full(c, rank * 1_000_000 + q * 1000 + t % 1000, np.int64)
                               for q, c in enumerate(counts)])
        recv, recv_counts = comm.alltoallv(send, counts)
        expected = np.concatenate([np.full((s + rank + t) % 3, s * 1_000_000 + rank * 1000 + t % 1000, np.int64)
                                   for s in range(size)])
        assert recv_counts.tolist() == [(s + rank + t) % 3 for s in range(size)]
        np.testing.assert_array_equal(recv, expected)
    return _fence_free_flags(comm), comm.stats["futex_sleeps"]


@pytest.mark.parametrize("fence_free", [(0, 1, 2), (1,), ()], ids=["all", "mixed", "none"])
def test_sleeping_waits_are_woken_by_fenced_and_fence_free_ranks(fence_free):
    """A rank registered for membarrier announces with no fence, and its sleepers
    run the barrier for it; ranks that keep their fences mix with such ranks.
    Every wait here sleeps: a wake lost to a missing barrier would hang the test."""
    available = _core.membarrier_works()
    with Ranks(_sleep_in_every_wait, 3, args=(2000,), setup=_allow_fence_free_in(fence_free),
               timeout=None) as ranks:
        results = ranks.collect(3, timeout=50)
    assert sorted(results) == [0, 1, 2], results
    assert all(status == "ok" for status, _ in results.values()), results
    expected_flags = [int(available and r in fence_free) for r in range(3)]
    assert all(value[0] == expected_flags for _, value in results.values()), results
    assert sum(value[1] for _, value in results.values()) > 0  # the sleeping path ran


def _retry_one_views_object(comm, kind):
    """Rank 1 is late (with its complete(0) or its post(0)); rank 0 retries one views object until it goes."""
    one = np.ones(2, np.int64)
    comm.post(0, one * (comm.rank + 1), [1, 1])
    if comm.rank == 1:
        # At lag 0, post_views(1) waits for rank 1's complete(0); complete_views(1) for its post(1).
        if kind == "post_views":
            time.sleep(SLOW_RANK_DELAY_S)
        comm.complete(0)
        if kind == "complete_views":
            time.sleep(SLOW_RANK_DELAY_S)
        comm.post(1, one * 3, [1, 1])
        return comm.complete(1)[0].tolist()
    comm.complete(0)
    if kind == "post_views":
        views = comm.post_views(1, [1, 1], np.int64, timeout=0.1)
    else:
        comm.post(1, one * 7, [1, 1])
        views = comm.complete_views(1, timeout=0.1)
    timeouts = 0
    while True:
        try:
            with views as got:
                if kind == "post_views":
                    for v in got:
                        v[:] = 7
                    break
                return timeouts, [v.tolist() for v in got]
        except blsshm.BlsTimeoutError:
            timeouts += 1
    return timeouts, comm.complete(1)[0].tolist()


@pytest.mark.parametrize("kind", ["post_views", "complete_views"])
def test_a_views_object_retried_after_a_timeout_waits_again(kind):
    """Each entry of a views object gets its own timeout: a retry after one waits again
    (it used to find the first entry's deadline spent and time out at once, over and over)."""
    (timeouts, got), of_rank_1 = blsshm.spawn(_retry_one_views_object, 2, args=(kind,))
    assert (got, of_rank_1) == (([7, 3] if kind == "post_views" else [[7], [3]]), [7, 3])
    # 0.5 s late at 0.1 s per try: a handful, where an instant timeout made thousands.
    assert 1 <= timeouts <= 20
