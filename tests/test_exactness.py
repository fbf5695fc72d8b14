"""I1 exactness (and I3): whatever the timing, complete(t) returns exactly what was posted."""
import time
import weakref

import numpy as np
import pytest

import blsshm
from blsshm import _core
from payload import counts_matrix, expected_recv, send_buffer

pytestmark = pytest.mark.timeout(120)


def _pipeline(comm, iters, seed, sleep_prob, mode):
    """The inference pattern: post(t); complete(t - L) once t >= L; then drain."""
    P, L, me = comm.size, comm.lag, comm.rank
    rng = np.random.default_rng([seed, 1000 + me])
    mismatches = []

    def check(t, recv, counts):
        col = counts_matrix(seed, t, P)[:, me]
        if not np.array_equal(counts, col) or not np.array_equal(recv, expected_recv(me, t, col)):
            mismatches.append(t)

    def post(t):
        row = counts_matrix(seed, t, P)[me]
        if mode == "zero-copy":
            with comm.post_views(t, row.tolist(), np.uint64) as views:
                for q, v in enumerate(views):
                    v[:] = send_buffer(me, t, [0] * q + [row[q]] + [0] * (P - q - 1))
        else:
            comm.post(t, send_buffer(me, t, row), row)

    def complete(t):
        if mode == "zero-copy":
            with comm.complete_views(t) as views:
                counts = np.array([v.size for v in views])
                recv = np.concatenate(views) if views else np.empty(0, np.uint64)
        else:
            recv, counts = comm.complete(t)
        check(t, recv, counts)

    for t in range(iters):
        if rng.random() < sleep_prob:
            time.sleep(rng.random() * 1e-3)
        post(t)
        if t >= L:
            complete(t - L)
    for t in range(max(0, iters - L), iters):
        complete(t)
    return mismatches, comm.stats


@pytest.mark.parametrize("lag", [0, 1, 4])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 8])
def test_pipeline_is_exact(size, lag):
    iters = 2000
    results = blsshm.spawn(_pipeline, size, lag=lag, arena_bytes=1 << 20,
                           args=(iters, 17 * size + lag, 0.02, "copy"))
    for rank, (mismatches, stats) in enumerate(results):
        assert mismatches == [], f"rank {rank} got wrong data at iterations {mismatches[:10]}"
        assert stats["iterations_completed"] == iters
    assert sum(s["bytes_sent"] for _, s in results) == sum(s["bytes_received"] for _, s in results)


def _pipeline_on_one_futex(comm, *args):
    _core._sleep_on_one_futex(True)  # as on a kernel without futex_waitv
    return _pipeline(comm, *args)


def test_pipeline_is_exact_when_sleeps_use_one_futex():
    # Without a spin, most waits sleep: they must still be woken by each post and complete.
    iters = 1000
    results = blsshm.spawn(_pipeline_on_one_futex, 3, lag=1, arena_bytes=1 << 20, spin_us=0,
                           args=(iters, 23, 0.05, "copy"))
    for rank, (mismatches, stats) in enumerate(results):
        assert mismatches == [], f"rank {rank} got wrong data at iterations {mismatches[:10]}"
        assert stats["iterations_completed"] == iters
    assert sum(s["futex_sleeps"] for _, s in results) > 0


@pytest.mark.parametrize("lag", [0, 3])
@pytest.mark.parametrize("size", [2, 3])
def test_zero_copy_is_exact(size, lag):
    results = blsshm.spawn(_pipeline, size, lag=lag, arena_bytes=1 << 20,
                           args=(1000, 5 + size + lag, 0.02, "zero-copy"))
    for rank, (mismatches, _) in enumerate(results):
        assert mismatches == [], f"rank {rank} got wrong data at iterations {mismatches[:10]}"


def _mixed(comm, iters, seed):
    """Copy and zero-copy paths interleaved must agree with each other and the reference."""
    P, me = comm.size, comm.rank
    bad = []
    for t in range(iters):
        row = counts_matrix(seed, t, P)[me]
        col = counts_matrix(seed, t, P)[:, me]
        if t % 2:
            comm.post(t, send_buffer(me, t, row), row)
        else:
            with comm.post_views(t, row, np.uint64) as views:
                np.concatenate(views)  # views exist for every destination
                start = 0
                full = send_buffer(me, t, row)
                for q, v in enumerate(views):
                    v[:] = full[start:start + row[q]]
                    start += row[q]
        if t % 3:
            recv, counts = comm.complete(t)
        else:
            with comm.complete_views(t) as views:
                recv = np.concatenate(views).copy()
                counts = np.array([len(v) for v in views])
        if not (np.array_equal(recv, expected_recv(me, t, col)) and np.array_equal(counts, col)):
            bad.append(t)
    return bad


def test_copy_and_zero_copy_paths_agree():
    for rank, bad in enumerate(blsshm.spawn(_mixed, 3, lag=0, args=(300, 99))):
        assert bad == [], f"rank {rank}: {bad[:10]}"


def _lag0_matches_synchronous(comm, iters, seed):
    """At L = 0 the blocking alltoallv is a synchronous alltoallv: compare with a reference
    computed from every rank's send buffer (the definition of alltoallv)."""
    P, me = comm.size, comm.rank
    rng = np.random.default_rng(seed)  # the same stream in every rank
    for t in range(iters):
        counts = rng.integers(0, 50, size=(P, P))
        sends = [rng.standard_normal(counts[s].sum()).astype(np.float32) for s in range(P)]
        recv, rcounts = comm.alltoallv(sends[me], counts[me])
        ref = np.concatenate([np.split(sends[s], np.cumsum(counts[s])[:-1])[me] for s in range(P)])
        assert np.array_equal(rcounts, counts[:, me])
        assert recv.dtype == np.float32 and np.array_equal(recv, ref), f"iteration {t}"
        # Synchronous: when alltoallv(t) returns, every rank has posted t,
        # and so completed t - 1 (even though posts no longer wait for that).
        published, completed = comm._counters()
        assert min(published) >= t + 1 and min(completed) >= t
    # recv_counts is read-only, shared while the counts repeat, and new when they change.
    P1 = [1] * P
    _, first = comm.alltoallv(np.ones(P, np.int32), P1)
    _, again = comm.alltoallv(np.ones(P, np.int32), P1)
    _, other = comm.alltoallv(np.ones(2 * P, np.int32), [2] * P)
    assert not first.flags.writeable and again is first
    assert other.tolist() == [2] * P and first.tolist() == P1
    return True


def test_lag_zero_is_synchronous_alltoallv():
    assert blsshm.spawn(_lag0_matches_synchronous, 4, lag=0, args=(300, 3)) == [True] * 4


def _dtypes(comm):
    out = []
    for dtype in (np.uint8, np.int16, np.float64, np.complex128, np.dtype(">i4"), np.bool_):
        counts = [comm.rank + q + 1 for q in range(comm.size)]
        send = (np.arange(sum(counts)) % 7 + comm.rank).astype(dtype)
        recv, rc = comm.alltoallv(send, counts)
        out.append((np.dtype(dtype).str, recv.dtype.str, recv.tolist(), rc.tolist()))
    return out


def test_any_fixed_dtype_round_trips():
    results = blsshm.spawn(_dtypes, 2)
    for me, per_dtype in enumerate(results):
        for sent_str, got_str, recv, rc in per_dtype:
            assert sent_str == got_str
            assert rc == [s + me + 1 for s in range(2)]
            exp = []
            for s in range(2):
                start = sum(s + q + 1 for q in range(me))
                vals = (np.arange(start, start + s + me + 1) % 7 + s).astype(np.dtype(sent_str))
                exp.extend(vals.tolist())
            assert recv == exp


def _counts_of_every_kind(comm):
    """The same irregular exchange with its counts given as a list and as arrays of several kinds."""
    counts = [comm.rank + 2 * q + 1 for q in range(comm.size)]
    send = np.arange(sum(counts), dtype=np.int64) + 100 * comm.rank
    kinds = {
        "list": counts,
        "int64": np.array(counts, np.int64),
        "int32": np.array(counts, np.int32),
        "uint16": np.array(counts, np.uint16),
        "strided int64": np.repeat(np.array(counts, np.int64), 2)[::2],
        "big-endian int64": np.array(counts, ">i8"),
        "received counts": comm.alltoallv(np.zeros(comm.size, np.int8), [1] * comm.size)[1] * counts,
    }
    out = {}
    for kind, c in kinds.items():
        recv, rc = comm.alltoallv(send, c)
        zc = comm.next_post
        with comm.post_views(zc, c, np.int64) as views:
            for q, v in enumerate(views):
                v[:] = send[sum(counts[:q]):sum(counts[:q + 1])]
        with comm.complete_views(zc) as got:
            zc_recv = np.concatenate([np.array(g) for g in got]).tolist()
        out[kind] = (recv.tolist(), rc.tolist(), zc_recv)
    return out


def test_counts_as_a_list_or_any_integer_array_give_the_same_exchange():
    for me, per_kind in enumerate(blsshm.spawn(_counts_of_every_kind, 3)):
        expected = []
        for s in range(3):
            start = sum(s + 2 * q + 1 for q in range(me))
            expected.extend(range(100 * s + start, 100 * s + start + s + 2 * me + 1))
        assert per_kind == {kind: (expected, [s + 2 * me + 1 for s in range(3)], expected) for kind in per_kind}


def _out_buffer(comm):
    out = np.full(100, -1, np.int32)
    recv, rc = comm.alltoallv(np.arange(4, dtype=np.int32) + 10 * comm.rank, [2, 2], out=out)
    return recv.tolist(), np.shares_memory(recv, out), out[4:].tolist()


def test_out_buffer_is_used():
    for me, (recv, shared, tail) in enumerate(blsshm.spawn(_out_buffer, 2)):
        assert recv == [2 * me, 2 * me + 1, 10 + 2 * me, 11 + 2 * me]
        assert shared and tail == [-1] * 96


def _held_results(comm):
    held = []
    for t in range(4):
        counts = [t + 1 + comm.rank] * comm.size
        held.append(comm.alltoallv(np.full(sum(counts), t, np.int64), counts))
        comm.alltoallv(np.zeros(comm.size, np.int64), [1] * comm.size)  # a result dropped at once
    dropped = weakref.ref(comm.alltoallv(np.zeros(comm.size, np.int64), [1] * comm.size)[0])
    comm.close()
    return [(recv.tolist(), counts.tolist()) for recv, counts in held], dropped() is None


def test_results_the_caller_holds_stay_as_they_were_returned():
    """The result tuple of a call is filled again by the next only when nobody holds it; close() lets go of it."""
    for held, released in blsshm.spawn(_held_results, 2):
        for t, (recv, counts) in enumerate(held):
            assert counts == [t + 1 + s for s in range(2)]
            assert recv == [t] * sum(counts)
        assert released


def _requests(comm):
    reqs = [comm.ialltoallv(np.full(comm.size, t, np.int64), [1] * comm.size) for t in range(3)]
    return [r.wait()[0].tolist() for r in reqs]


def test_requests_complete_in_order():
    for res in blsshm.spawn(_requests, 3, lag=2):
        assert res == [[0] * 3, [1] * 3, [2] * 3]


def _random_records(comm, iters, seed, max_count=180, pipelined=True):
    """Records of random sizes (counts below ``max_count``, a fifth of them
    zero), ranks out of step by random sleeps, every block checked.
    ``pipelined``: ``post(t); complete(t - L)``, else ``post(t); complete(t)``."""
    P, L, me = comm.size, comm.lag, comm.rank
    if not pipelined:
        L = 0
    rng = np.random.default_rng([seed, me])

    def counts(t):
        c = np.random.default_rng([seed, t]).integers(0, max_count, size=(P, P))
        c[np.random.default_rng([seed, t, 1]).random((P, P)) < 0.2] = 0
        return c

    bad = []
    for t in range(iters):
        if rng.random() < 0.05:
            time.sleep(rng.random() * 5e-4)
        comm.post(t, send_buffer(me, t, counts(t)[me]), counts(t)[me])
        if t >= L:
            recv, rc = comm.complete(t - L)
            if not np.array_equal(recv, expected_recv(me, t - L, counts(t - L)[:, me])):
                bad.append(t - L)
    for t in range(max(0, iters - L), iters):
        comm.complete(t)
    return bad


def test_arena_ring_wraps_exactly():
    """An arena that holds barely (lag + 2) of the largest record: the ring
    wraps constantly, pads its end, and reuses every byte."""
    # largest record: 2 blocks x 179 x 8 bytes, 64-aligned = 2944 bytes; (3 + 2) x 2944 <= 16 KiB
    for rank, bad in enumerate(blsshm.spawn(_random_records, 2, lag=3, arena_bytes=16384, args=(3000, 11))):
        assert bad == [], f"rank {rank}: {bad[:10]}"


@pytest.mark.parametrize("pipelined", [False, True])
def test_records_of_mixed_sizes_are_exact_in_a_larger_arena(pipelined):
    """Records of 0 to 72 KiB in a 1 MiB arena at lag 3.  Completing each
    post at once, small ones go round the arena's start early
    (_core.RECYCLE_BYTES) next to records the others still read; pipelined,
    with this rank's own posts outstanding, they go round all of it."""
    for rank, bad in enumerate(blsshm.spawn(_random_records, 3, lag=3, arena_bytes=1 << 20,
                                            args=(1500, 12, 3000, pipelined))):
        assert bad == [], f"rank {rank}: {bad[:10]}"


def _growing_records(comm, sizes):
    """``post(t); complete(t - L)`` with records of the given sizes."""
    P, L = comm.size, comm.lag
    got = []
    for t, n in enumerate(sizes):
        comm.post(t, np.full(n, t % 256, np.uint8), [n // P] * P)
        if t >= L:
            got.append(int(comm.complete(t - L)[0][0]))
    for t in range(max(0, len(sizes) - L), len(sizes)):
        got.append(int(comm.complete(t)[0][0]))
    return got


def test_wrapping_early_keeps_room_for_the_records_the_lag_allows():
    """(lag + 2) x the largest record is enough, however the ring wrapped:
    here a wrap to the arena's start after the third record, with records
    2 and 3 in flight, would leave 264 KiB before record 2 for a 1 MiB one,
    and post(4) would raise ArenaFullError in a 32 MiB arena."""
    sizes = [16 << 10, 256 << 10, 8 << 10, 8 << 10, 1 << 20, 8 << 10]
    for got in blsshm.spawn(_growing_records, 2, lag=2, args=(sizes,)):
        assert got == list(range(len(sizes)))


def _block_offsets(comm, iters, count):
    """Where in its arena each of ``iters`` blocking alltoallv put its block
    for the other rank, read back from its own mailbox (only it writes it)."""
    lay = _core.layout(comm.size, comm.lag, comm.arena_bytes)
    line, block_offset = 128, 48  # bls_mbox_t in _layout.h
    peer = 1 - comm.rank
    send = np.full(2 * count, comm.rank, np.uint8)
    where = []
    for t in range(iters):
        recv, _ = comm.alltoallv(send, [count, count])
        assert (recv[:count] == 0).all() and (recv[count:] == 1).all()
        slot = t % lay["slots"]
        at = lay["mbox_offset"] + ((comm.rank * comm.size + peer) * lay["slots"] + slot) * line + block_offset
        where.append(int(np.frombuffer(comm._mapping, np.uint64, 1, at)[0]))
    return where


def test_records_keep_to_the_start_of_the_arena():
    """A loop of blocking calls puts its records round the first
    RECYCLE_BYTES of the 32 MiB arena, not all of it, so their lines and
    pages stay in the caches and the TLB."""
    count, iters = 4096, 300  # records of 8 KiB: 300 of them would span 2.4 MiB
    for rank, where in enumerate(blsshm.spawn(_block_offsets, 2, args=(iters, count))):
        assert max(where) < _core.RECYCLE_BYTES + 2 * count, f"rank {rank}: a block at {max(where)}"
        assert len(set(where)) < iters, f"rank {rank}: no record reused its lines"


def _inline_after_large(comm, large):
    """A large record at the arena's start, then one of blocks small enough
    for the mailboxes (no record: 0 bytes in the ring), then another record,
    all posted before any completes."""
    P = comm.size
    comm.post(0, np.zeros(large * P, np.uint8), [large] * P)
    comm.post(1, np.ones(P, np.uint8), [1] * P)
    comm.post(2, np.full(1024 * P, 2, np.uint8), [1024] * P)
    return [comm.complete(t)[0][0] for t in range(3)]


def test_a_post_without_a_record_does_not_make_the_arena_look_full():
    """The mailbox-only post must not wrap the ring to its start: with the
    large record of iteration 0 there, head == tail would read as full and
    post(2) would fail with ArenaFullError.  Two rules of Core._fit keep it
    from wrapping (no early wrap for an empty record, nor with this rank's
    posts outstanding); this fails only if both go."""
    large = _core.RECYCLE_BYTES  # two blocks: the head ends past RECYCLE_BYTES
    for res in blsshm.spawn(_inline_after_large, 2, lag=2, args=(large,)):
        assert res == [0, 1, 2]


def _views_outlive_close(comm):
    comm.post(0, np.arange(4, dtype=np.int32) + 10 * comm.rank, [2, 2])
    with comm.complete_views(0) as views:
        kept = list(views)
    comm.close()
    return [v.tolist() for v in kept]  # still mapped: the views keep the memory


def test_views_stay_valid_after_close():
    for me, views in enumerate(blsshm.spawn(_views_outlive_close, 2)):
        assert views == [[2 * me, 2 * me + 1], [10 + 2 * me, 11 + 2 * me]]


def _own_block_paths(comm):
    """A blocking alltoallv copies its own block from send to out directly;
    these are the cases where it must not, or must catch up later."""
    P, me = comm.size, comm.rank
    # In place (out overlaps send): the larger blocks of lower ranks, gathered
    # before ours, would overwrite our own block in send before it is copied.
    def size(s):
        return 1 + 3 * (P - 1 - s)  # what rank s sends to each rank

    def block(s, q):
        return 1000 * s + 10 * q + np.arange(size(s))

    buf = np.zeros(max(P * size(me), sum(size(s) for s in range(P))), np.int64)
    send = buf[:P * size(me)]
    send[:] = np.concatenate([block(me, q) for q in range(P)])
    recv, _ = comm.alltoallv(send, [size(me)] * P, out=buf)
    assert np.array_equal(recv, np.concatenate([block(s, me) for s in range(P)]))

    # Rank 0's complete times out (rank 1 posts only once it sees rank 0's
    # post): iteration t stays posted, rank 0 changes send, and a later
    # complete(t) must still deliver the block rank 0 sent itself.
    t = comm.next_post
    counts = [3] * P
    send = np.arange(3 * P) + 100 * me
    expected = np.concatenate([np.arange(3 * me, 3 * me + 3) + 100 * s for s in range(P)])
    if me == 0:
        try:
            recv, _ = comm.alltoallv(send, counts, timeout=0)
        except blsshm.BlsTimeoutError:
            send[:] = -1
            recv, _ = comm.complete(t)
    else:
        while comm._counters()[0][0] < t + 1:
            time.sleep(0.001)
        time.sleep(0.05)
        recv, _ = comm.alltoallv(send, counts)
    assert np.array_equal(recv, expected)
    return True


@pytest.mark.parametrize("P", [1, 2, 3])
def test_own_block_in_place_and_after_a_timeout(P):
    assert blsshm.spawn(_own_block_paths, P, lag=1) == [True] * P


def test_published_and_received_views_cannot_be_made_writable_again():
    """A write through a view after publishing would change what receivers read (I1)."""
    with blsshm.Comm.create(1, lag=1) as comm:
        with comm.post_views(0, [4], np.float32) as views:
            views[0][:] = 2.0
        sent = views[0]
        with comm.complete_views(0) as received:
            for view in (sent, received[0]):
                assert not view.flags.writeable
                with pytest.raises(ValueError):
                    view.flags.writeable = True
                with pytest.raises(ValueError):
                    view[0] = 99.0
            assert received[0].tolist() == [2.0] * 4


def test_views_are_a_tuple_so_replacing_one_fails_before_anything_is_published():
    """``views[q] = x`` (meant: ``views[q][:] = x``) would publish the old bytes: it raises instead."""
    with blsshm.Comm.create(1, lag=1) as comm:
        with pytest.raises(TypeError):
            with comm.post_views(0, [4], np.float32) as views:
                views[0][:] = 1.0
                views[0] = np.full(4, 3.0, np.float32)
        assert comm.next_post == 0  # the exception cancelled the post: t may be posted again
        with comm.post_views(0, [4], np.float32) as views:
            assert isinstance(views, tuple)
            published = views[0]
            published[:] = 3.0
        assert not published.flags.writeable
        with comm.complete_views(0) as received:
            assert isinstance(received, tuple)
            assert received[0].tolist() == [3.0] * 4
