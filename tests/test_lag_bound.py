"""I2 made observable: post(t) waits exactly while some rank has not completed t - L - 1."""
import time

import numpy as np
import pytest

import blsshm
from blsshm import BlsTimeoutError

pytestmark = pytest.mark.timeout(60)


def _held_back(comm, k, holding, release):
    """Both ranks run k iterations; then rank 1 posts iteration k and holds
    until released, and rank 0 runs ahead as far as the lag bound lets it."""
    L = comm.lag
    one = np.ones(2, np.int64)
    for t in range(k):
        comm.alltoallv(one * t, [1, 1])
    if comm.rank == 1:
        comm.post(k, one * k, [1, 1])
        holding.set()
        release.wait(30)
        comm.complete(k)
        for t in range(k + 1, k + L + 2):
            comm.post(t, one * t, [1, 1])
            comm.complete(t)
        return None
    holding.wait(30)
    # Now every rank has completed k iterations: posts k .. k + L must go
    # through without waiting at all (timeout=0 fails on any wait).
    outcome = {}
    for t in range(k, k + L + 1):
        comm.post(t, one * t, [1, 1], timeout=0)
    outcome["posted_without_wait"] = comm.next_post
    comm.complete(k)  # rank 1 posted k; now rank 0 has completed k + 1
    try:
        comm.post(k + L + 1, one, [1, 1], timeout=0.3)
        outcome["blocked"] = False
    except BlsTimeoutError as exc:
        outcome["blocked"] = True
        outcome["waiting_for"] = list(exc.waiting_for)
        outcome["next_post_after_timeout"] = comm.next_post
    release.set()
    # The same post goes through once the slow rank moves, and data stay exact.
    comm.post(k + L + 1, one * (k + L + 1), [1, 1])
    for t in range(comm.next_complete, k + L + 2):
        recv, _ = comm.complete(t)
        assert recv.tolist() == [t, t], (t, recv)
    return outcome


@pytest.mark.parametrize("lag", [0, 1, 3])
@pytest.mark.parametrize("k", [0, 2])
def test_post_blocks_exactly_beyond_the_lag(lag, k):
    import multiprocessing
    ctx = multiprocessing.get_context()
    holding, release = ctx.Event(), ctx.Event()
    outcome = blsshm.spawn(_held_back, 2, lag=lag, args=(k, holding, release))[0]
    assert outcome["posted_without_wait"] == k + lag + 1
    assert outcome["blocked"] is True
    assert outcome["waiting_for"] == [1]
    assert outcome["next_post_after_timeout"] == k + lag + 1  # the timed-out post changed nothing


def _blocking_post(comm, k, seen):
    """Both ranks run k blocking iterations; then rank 1 posts k .. k + L with
    the split calls and holds its completes back, while rank 0 runs blocking
    alltoallv up to k + L + 1."""
    L = comm.lag
    one = np.ones(2, np.int64)
    for t in range(k):
        comm.alltoallv(one * t, [1, 1])
    if comm.rank == 0:
        return [comm.alltoallv(one * (100 + t), [1, 1])[0].tolist() for t in range(k, k + L + 2)]
    for t in range(k, k + L + 1):
        comm.post(t, one * (200 + t), [1, 1])
    deadline = time.monotonic() + 30
    while comm._counters()[0][0] < k + L + 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    seen.put(comm._counters())
    received = [comm.complete(t)[0].tolist() for t in range(k, k + L + 1)]
    t = k + L + 1
    return received + [comm.alltoallv(one * (200 + t), [1, 1])[0].tolist()]


@pytest.mark.parametrize("lag", [0, 1, 3])
def test_a_blocking_alltoallv_publishes_before_the_others_completed(lag):
    """Its slot (one of L + 2) is free, so its post of k + L + 1 need not wait
    for rank 1's complete(k), which a split post would (I2); the call still
    returns only once rank 1 posted k + L + 1."""
    import multiprocessing
    k = 5
    seen = multiprocessing.get_context().Queue()
    results = blsshm.spawn(_blocking_post, 2, lag=lag, args=(k, seen))
    published, completed = seen.get(timeout=5)
    assert published == [k + lag + 2, k + lag + 1] and completed == [k + lag + 1, k]
    expected = [[100 + t, 200 + t] for t in range(k, k + lag + 2)]
    assert results == [expected, expected]


def _complete_waits_for_posts(comm):
    if comm.rank == 0:
        comm.post(0, np.zeros(2), [1, 1])
        try:
            comm.complete(0, timeout=0.2)
            result = None
        except BlsTimeoutError as exc:
            result = ("timeout", exc.operation, exc.iteration, list(exc.waiting_for))
        recv, _ = comm.complete(0)  # still usable: the peer posts and we complete
        return result, recv.tolist()
    import time
    time.sleep(3.0)  # far longer than rank 0's timeout, even on a loaded machine
    comm.post(0, np.ones(2), [1, 1])
    return None, comm.complete(0)[0].tolist()


def test_complete_waits_until_every_rank_posted():
    (r0, recv0), (_, recv1) = blsshm.spawn(_complete_waits_for_posts, 2)
    assert r0 == ("timeout", "complete", 0, [1])
    assert recv0 == [0.0, 1.0] and recv1 == [0.0, 1.0]


def _own_completion_required(comm):
    comm.post(0, np.zeros(1), [1])
    try:
        comm.post(1, np.zeros(1), [1])  # lag 0: needs this rank's own complete(0) first
    except blsshm.BlsValueError as exc:
        msg = str(exc)
    comm.complete(0)
    comm.post(1, np.zeros(1), [1])
    comm.complete(1)
    return msg


def test_post_without_own_complete_is_refused_not_deadlocked():
    msg = blsshm.spawn(_own_completion_required, 1)[0]
    assert "completed" in msg


def _arrival(comm, checked):
    one = np.ones(2, np.int64)
    if comm.rank == 1:
        checked.wait(30)  # rank 0 looked while only it had posted
        comm.post(0, one, [1, 1])
        return comm.complete(0)[0].tolist()
    comm.post(0, one * 5, [1, 1])
    before = [comm.arrived(0), comm.arrived(1)]
    checked.set()
    while not comm.arrived(0):
        pass
    return before, comm.arrived(1), comm.complete(0, timeout=0)[0].tolist()


def test_arrived_says_without_waiting_whether_complete_would_wait():
    import multiprocessing
    ctx = multiprocessing.get_context()
    (before, later, recv), _ = blsshm.spawn(_arrival, 2, lag=1, args=(ctx.Event(),))
    assert before == [False, False]  # rank 1 had not posted 0; nobody had posted 1
    assert later is False
    assert recv == [5, 1]  # complete(0) found everything there (timeout=0 never waits)


def test_arrived_does_not_wait_for_the_ranks_to_attach():
    # It waited for every rank to attach: here it raised BlsTimeoutError after
    # attach_timeout; by default it blocked up to 60 s.
    comm = blsshm.Comm.create(2, 0, arena_bytes=1 << 16, attach_timeout=0.5)
    try:
        assert comm.arrived(0) is False  # rank 1 never attached, so nobody posted
        # A loop that polls is still told, after attach_timeout, that rank 1 never came.
        with pytest.raises(blsshm.BlsTimeoutError, match=r"rank\(s\) \[1\] did not attach"):
            while not comm.arrived(0):
                time.sleep(0.01)
        # The communicator stays usable: polling again waits a new attach_timeout
        # (it raised at once, forever, from the old deadline).
        assert comm.arrived(0) is False
    finally:
        comm.close()
