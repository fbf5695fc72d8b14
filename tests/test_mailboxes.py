"""Small blocks travel in per-pair mailboxes, larger ones in records: both, and the switch.

An iteration goes through the mailboxes when every block fits one
(``BLS_MBOX_DATA`` = 80 bytes), else through the sender's record.  These
tests alternate the two on every slot, at the boundary, with the copy and
the zero-copy paths, and run a segment too big to have mailboxes at all.
"""
import numpy as np
import pytest

import blsshm
from blsshm import _core
from payload import block, expected_recv, send_buffer

pytestmark = pytest.mark.timeout(120)

MBOX_DATA = 80  # bytes; _layout.h's BLS_MBOX_DATA


def counts_for(t, P, me):
    """Counts (uint64 elements) each rank sends at ``t``: all fit, one does not, zeros, the edge."""
    kind = t % 4
    if kind == 0:    # every block fits: mailboxes
        return [(3 * me + q + t) % 11 for q in range(P)]
    if kind == 1:    # one block of one rank is too big: that rank uses its record
        return [MBOX_DATA // 8 + 1 if (me + t) % P == q else 1 for q in range(P)]
    if kind == 2:    # nothing at all
        return [0] * P
    return [MBOX_DATA // 8] * P  # exactly a mailbox each


def _alternate(comm, iters, zero_copy):
    P, L, me = comm.size, comm.lag, comm.rank
    bad = []

    def post(t):
        row = counts_for(t, P, me)
        if zero_copy:
            with comm.post_views(t, row, np.uint64) as views:
                for q, v in enumerate(views):
                    v[:] = block(me, q, t, row[q])
        else:
            comm.post(t, send_buffer(me, t, row), row)

    def complete(t):
        col = [counts_for(t, P, s)[me] for s in range(P)]
        if zero_copy:
            with comm.complete_views(t) as views:
                got = np.concatenate(views)
        else:
            got, counts = comm.complete(t)
            if counts.tolist() != col:
                bad.append(("counts", t))
        if not np.array_equal(got, expected_recv(me, t, col)):
            bad.append(("bytes", t))

    for t in range(iters):
        post(t)
        if t >= L:
            complete(t - L)
    for t in range(max(0, iters - L), iters):
        complete(t)
    return bad


@pytest.mark.parametrize("P,lag", [(1, 0), (2, 0), (2, 1), (3, 4), (4, 0), (4, 4)])
@pytest.mark.parametrize("zero_copy", [False, True], ids=["copy", "zero-copy"])
def test_mailbox_and_record_iterations_alternate(P, lag, zero_copy):
    assert _core.layout(P, lag, 1 << 20)["mbox_offset"] > 0
    assert blsshm.spawn(_alternate, P, lag=lag, args=(200, zero_copy), timeout=60) == [[]] * P


def _blocking_edge(comm):
    """Blocking alltoallv of uint8 at 80 and 81 bytes per pair, own block included."""
    P, me = comm.size, comm.rank
    for n in (MBOX_DATA, MBOX_DATA + 1, 1, MBOX_DATA):
        send = np.concatenate([np.full(n, 16 * me + q, np.uint8) for q in range(P)])
        recv, counts = comm.alltoallv(send, [n] * P)
        want = np.concatenate([np.full(n, 16 * s + me, np.uint8) for s in range(P)])
        if counts.tolist() != [n] * P or not np.array_equal(recv, want):
            return False
    return True


def test_blocking_alltoallv_at_the_mailbox_edge():
    assert blsshm.spawn(_blocking_edge, 3, lag=1, timeout=60) == [True] * 3


@pytest.mark.parametrize("zero_copy", [False, True], ids=["copy", "zero-copy"])
def test_a_segment_too_big_for_mailboxes_uses_records_only(zero_copy):
    lag = 32768  # 2 x 2 x 32770 lines > 16 MiB: no mailboxes
    assert _core.layout(2, lag, 16 << 20)["mbox_offset"] == 0
    # Enough iterations that every descriptor slot is reused at least once.
    assert blsshm.spawn(_alternate, 2, lag=lag, arena_bytes=16 << 20, args=(lag + 300, zero_copy),
                        timeout=120) == [[], []]


@pytest.mark.parametrize("zero_copy", [False, True], ids=["copy", "zero-copy"])
def test_blocks_that_fit_mailboxes_need_no_room_in_the_arena(zero_copy):
    # With 80 ranks, 80 one-element blocks laid out in a record take 80 x 64
    # bytes: the post was refused as too big for a 4 KiB arena, though it
    # uses mailboxes and no arena at all.  A record that does need the arena
    # is still refused, and the communicator still works after it.
    P = 80
    comms = [blsshm.Comm.create(P, 0, arena_bytes=4096)]
    try:
        comms += [blsshm.Comm.attach(comms[0].name, r) for r in range(1, P)]
        for c in comms:
            if zero_copy:
                with c.post_views(0, [1] * P, np.float64) as views:
                    for q, v in enumerate(views):
                        v[0] = 1000 * c.rank + q
            else:
                c.post(0, np.arange(P) + 1000.0 * c.rank, [1] * P)
        for c in comms:
            assert c.complete(0)[0].tolist() == [1000.0 * s + c.rank for s in range(P)]
        with pytest.raises(blsshm.ArenaFullError, match=r"send_counts\[21\] = 20 elements of 8 bytes"):
            comms[0].post(1, np.zeros(20 * P), [20] * P)
        comms[0].post(1, np.zeros(P), [1] * P)
    finally:
        for c in comms:
            c.close()
