"""Direct reads: a blocking alltoallv offers large blocks, receivers copy them
straight from the sender's send buffer (process_vm_readv); see BLS_DIRECT_* in
blsshm/_layout.h.  Results must be exactly those of the record path, whoever
wins each hand-over, and a sender or receiver that fails mid-way must never
leave a peer hanging or reading a buffer that changed."""
import os
import signal
import time

import numpy as np
import pytest

import blsshm
from blsshm import _core
from harness import Ranks, process_state, wait_until_published
from payload import counts_matrix, expected_recv, send_buffer

pytestmark = pytest.mark.timeout(120)


def _counts(seed, t, size):
    # Up to 16 KiB per pair, one pair of 256 KiB every fourth iteration.
    return counts_matrix(seed, t, size, max_count=2048, huge=32768)


def _exchange(comm, iters, seed, styles):
    """Every style of call against blocking senders that offer every record block.

    ``styles`` cycles per iteration: "blocking" (offers and reads), "split"
    (post/complete: reads offers, makes none) and "views" (complete_views:
    asks for the record).  Returns the iterations that came out wrong and
    the stats.
    """
    P, me = comm.size, comm.rank
    comm.direct_min_bytes = 1  # every block that is not inline
    rng = np.random.default_rng([seed, me])
    bad = []
    for t in range(iters):
        row, col = _counts(seed, t, P)[me], _counts(seed, t, P)[:, me]
        if rng.random() < 0.05:
            time.sleep(rng.random() * 1e-3)  # so that each side of a hand-over sometimes wins
        style = styles[(t + me) % len(styles)]
        send = send_buffer(me, t, row)
        if style == "blocking":
            recv, counts = comm.alltoallv(send, row)
        elif style == "split":
            comm.post(t, send, row)
            recv, counts = comm.complete(t)
        else:
            comm.post(t, send, row)
            with comm.complete_views(t) as views:
                counts = np.array([v.size for v in views])
                recv = np.concatenate(views)
        send[:] = 0  # a read after the call returned would see this
        if not np.array_equal(counts, col) or not np.array_equal(recv, expected_recv(me, t, col)):
            bad.append(t)
    return bad, comm.stats


@pytest.mark.parametrize("size, lag", [(2, 0), (3, 2), (4, 1)])
@pytest.mark.parametrize("styles", [("blocking",), ("blocking", "split", "blocking", "views")])
def test_direct_reads_are_exact(size, lag, styles):
    iters = 400
    results = blsshm.spawn(_exchange, size, lag=lag, arena_bytes=8 << 20, args=(iters, 7 * size + lag, styles))
    for rank, (bad, stats) in enumerate(results):
        assert bad == [], f"rank {rank} got wrong data at iterations {bad[:10]}"
        assert stats["iterations_completed"] == iters
    assert sum(s["bytes_sent"] for _, s in results) == sum(s["bytes_received"] for _, s in results)
    # The path under test was taken (each offer is read directly unless its
    # sender finishes its own receiving first: not 400 times in a row).
    assert sum(s["bytes_read_direct"] for _, s in results) > 0


def _one_rank_cannot_read(comm, iters, seed):
    if comm.rank == 1:
        _core._fail_direct_reads(True)  # as ptrace rules would refuse it
    return _exchange(comm, iters, seed, ("blocking",))


def test_a_rank_that_cannot_read_its_peers_gets_their_blocks_through_the_records():
    iters = 300
    results = blsshm.spawn(_one_rank_cannot_read, 3, lag=1, arena_bytes=8 << 20, args=(iters, 11))
    for rank, (bad, _) in enumerate(results):
        assert bad == [], f"rank {rank} got wrong data at iterations {bad[:10]}"
    assert results[1][1]["bytes_read_direct"] == 0
    assert results[0][1]["bytes_read_direct"] + results[2][1]["bytes_read_direct"] > 0


def test_direct_reads_can_be_turned_off():
    def run(comm):
        comm.direct_min_bytes = 0
        send = np.arange(2 * 100_000, dtype=np.float32)
        for _ in range(20):
            recv, _ = comm.alltoallv(send, [100_000, 100_000])
        return comm.stats["bytes_read_direct"], recv[:3].tolist()

    results = blsshm.spawn(run, 2)
    assert [direct for direct, _ in results] == [0, 0]
    assert results[1][1] == [100_000.0, 100_001.0, 100_002.0]


BLOCK = 64 * 1024  # elements of 8 bytes per pair: offered at the default threshold


def _offers_then_is_stopped(comm):
    """Rank 0 offers its blocks in a blocking alltoallv and waits there for rank 1's post."""
    if comm.rank == 0:
        comm.alltoallv(np.zeros(2 * BLOCK), [BLOCK, BLOCK])
        return "returned"
    # Rank 1: once rank 0 has offered, stop it in its wait, post, and then
    # do to it what the test asks while it cannot withdraw its offer.
    wait_until_published(comm, 0, 1)
    pid0 = comm._peer_pids()[0][0]
    os.kill(pid0, signal.SIGSTOP)
    while process_state(pid0) != "T":
        time.sleep(0.001)
    comm.post(0, np.ones(2 * BLOCK), [BLOCK, BLOCK])
    return pid0


def _reads_from_a_sender_killed_after_offering(comm):
    pid0 = _offers_then_is_stopped(comm)
    if comm.rank == 0:
        return pid0
    os.kill(pid0, signal.SIGKILL)
    while process_state(pid0) not in ("Z", None):
        time.sleep(0.001)
    started = time.monotonic()
    try:
        comm.complete(0)
    except blsshm.PeerLostError as exc:
        return "PeerLostError", exc.lost_rank, time.monotonic() - started
    return "completed"


def test_a_sender_killed_after_offering_a_block_is_a_lost_peer():
    with Ranks(_reads_from_a_sender_killed_after_offering, 2) as ranks:
        outcomes = ranks.collect(1, timeout=30)
    status, value = outcomes[1]
    assert status == "ok", value
    name, lost, seconds = value
    assert (name, lost) == ("PeerLostError", 0)
    assert seconds < 2


def _times_out_waiting_for_a_stopped_sender(comm):
    pid0 = _offers_then_is_stopped(comm)
    if comm.rank == 0:
        return pid0
    _core._fail_direct_reads(True)  # so rank 1 needs rank 0 to copy its block to the record
    try:
        comm.complete(0, timeout=0.3)
    except blsshm.BlsTimeoutError as exc:
        timeout = (isinstance(exc, TimeoutError), exc.waiting_for, str(exc))
    else:
        timeout = None
    finally:
        os.kill(pid0, signal.SIGCONT)
    try:
        comm.post(1, np.ones(2), [1, 1])
    except blsshm.CommAborted as exc:
        return timeout, str(exc)
    return timeout, "posted"


def test_a_receiver_that_times_out_waiting_for_a_copy_aborts_the_communicator():
    with Ranks(_times_out_waiting_for_a_stopped_sender, 2, timeout=30) as ranks:
        outcomes = ranks.collect(2, timeout=60)
    status, value = outcomes[1]
    assert status == "ok", value
    (is_timeout_error, waiting_for, message), aborted = value
    assert is_timeout_error and tuple(waiting_for) == (0,), message
    assert "direct copy" in message and "cannot be retried" in message
    assert "direct copy with rank 0 (timed out)" in aborted
    # Rank 0, woken, finds its offer refused, copies the block, and finishes
    # its call (every block it needed had arrived) or sees the abort.
    status0, value0 = outcomes[0]
    assert (status0, value0) == ("ok", "returned") or value0[0] == "CommAborted", value0
