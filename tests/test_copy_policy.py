"""Every copy policy delivers the same bytes; "auto" measures both strategies.

A post copies its blocks for other ranks into its record with ordinary or
with streaming stores (``comm.copy_policy``, see ``_copy.h``).  The two differ
only in speed, so these tests check exactness under each, at sizes and
alignments that exercise the streaming copy's head and tail, and what the
policy reports it did.  No test here looks at a clock.
"""
import os

import numpy as np
import pytest

import blsshm
from blsshm import Comm
from payload import block, expected_recv, send_buffer

pytestmark = pytest.mark.timeout(120)

POLICIES = ["cached", "stream", "auto"]
MBOX_DATA = 80  # bytes; _layout.h's BLS_MBOX_DATA


def large_counts(seed, t, P):
    """uint64 counts from 0 to ~48 KiB per block, so most posts carry 16 KiB or more for peers."""
    rng = np.random.default_rng([seed, t])
    c = rng.integers(0, 6000, size=(P, P))
    c[rng.random((P, P)) < 0.2] = 0
    c[rng.random((P, P)) < 0.2] = 1  # odd tails of one element
    return c


def _exchange(comm, iters, seed, policy):
    comm.copy_policy = policy
    P, L, me = comm.size, comm.lag, comm.rank
    bad = []
    peer_bytes = 0
    for t in range(iters):
        row = large_counts(seed, t, P)[me]
        comm.post(t, send_buffer(me, t, row), row)
        if any(c * 8 > MBOX_DATA for c in row):  # a record, not mailboxes
            peer_bytes += 8 * (int(row.sum()) - int(row[me]))
        if t >= L:
            u = t - L
            got, _ = comm.complete(u)
            if not np.array_equal(got, expected_recv(me, u, large_counts(seed, u, P)[:, me])):
                bad.append(u)
    for u in range(max(0, iters - L), iters):
        got, _ = comm.complete(u)
        if not np.array_equal(got, expected_recv(me, u, large_counts(seed, u, P)[:, me])):
            bad.append(u)
    return bad, comm.stats, peer_bytes, comm._copy_estimates()


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_is_exact_across_processes(policy):
    iters = 300
    results = blsshm.spawn(_exchange, 3, lag=1, arena_bytes=4 << 20, args=(iters, 7, policy))
    for rank, (bad, stats, peer_bytes, (cached, stream)) in enumerate(results):
        assert bad == [], f"rank {rank} got wrong data at iterations {bad[:10]}"
        if policy == "cached":
            assert stats["bytes_streamed"] == 0
        elif policy == "stream":  # not to a rank on this rank's CPU (3 ranks, 2 cores)
            assert stats["bytes_streamed"] <= peer_bytes
        else:  # the first large post measures cached stores, the second streaming ones
            assert cached > 0 and stream > 0
            assert 0 < stats["bytes_streamed"] <= peer_bytes


def _stream_to_peer(comm, same_cpu, iters, n):
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[0] if same_cpu or comm.rank == 0 else cpus[1]})
    comm.copy_policy = "stream"
    send = np.arange(2 * n, dtype=np.uint8)
    for t in range(iters):
        if t == iters // 2:
            first_half = comm.stats["bytes_streamed"]
        got, _ = comm.alltoallv(send, [n, n])
    assert np.array_equal(got, np.concatenate([send[comm.rank * n:(comm.rank + 1) * n]] * 2))
    return first_half, comm.stats["bytes_streamed"]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
@pytest.mark.parametrize("same_cpu", [False, True], ids=["two CPUs", "one CPU"])
def test_stream_writes_ordinary_stores_for_a_receiver_on_our_cpu(same_cpu):
    # It read the lines back from memory, not from the caches the two share.
    iters, n = 50, 16 * 1024  # the largest block _core's SHARED_CACHE_MAX_BYTES stores cached
    halves = blsshm.spawn(_stream_to_peer, 2, args=(same_cpu, iters, n))
    if same_cpu:
        # Only posts before the peer's first wait showed where it runs (1 or 2
        # as a rule; on one CPU each rank waits at least every other iteration).
        assert all(total == first for first, total in halves), halves
    else:
        assert [total for _, total in halves] == [iters * n] * 2


def _pair(lag=1):
    a = Comm.create(2, 0, lag=lag, arena_bytes=1 << 20, timeout=10)
    b = Comm.attach(a.name, 1, timeout=10)
    return a, b


@pytest.mark.parametrize("nbytes", [16 * 1024 + 1, 64 * 1024 + 63, 100_003])
@pytest.mark.parametrize("src_offset", [0, 1, 13])
def test_streaming_copies_unaligned_sources_and_odd_lengths(nbytes, src_offset):
    a, b = _pair()
    with a, b:
        a.copy_policy = b.copy_policy = "stream"
        rng = np.random.default_rng(nbytes + src_offset)
        sends = {}
        for comm in (a, b):
            counts = [nbytes, nbytes + 7] if comm.rank == 0 else [nbytes + 5, nbytes]
            raw = rng.integers(0, 256, size=sum(counts) + src_offset, dtype=np.uint8)
            sends[comm.rank] = (raw[src_offset:], counts)  # starts src_offset bytes off alignment
            comm.post(0, *sends[comm.rank])
        for comm in (a, b):
            got, got_counts = comm.complete(0)
            want = [sends[s][0][sum(sends[s][1][:comm.rank]):][:sends[s][1][comm.rank]] for s in (0, 1)]
            assert got_counts.tolist() == [sends[s][1][comm.rank] for s in (0, 1)]
            assert np.array_equal(got, np.concatenate(want))
            assert comm.stats["bytes_streamed"] == sends[comm.rank][1][1 - comm.rank]


def test_mailbox_posts_are_never_streamed():
    a, b = _pair()
    with a, b:
        a.copy_policy = b.copy_policy = "stream"
        for t in range(3):
            for comm in (a, b):
                comm.post(t, block(comm.rank, 0, t, 20), [10, 10])  # 80 bytes each: mailboxes
            for comm in (a, b):
                comm.complete(t)
        assert a.stats["bytes_streamed"] == b.stats["bytes_streamed"] == 0


def test_a_bad_policy_is_refused_and_the_old_one_kept():
    a, b = _pair()
    with a, b:
        a.copy_policy = "stream"
        with pytest.raises(blsshm.BlsValueError, match=r"copy_policy must be one of .*'auto'.*'nt'"):
            a.copy_policy = "nt"
        assert a.copy_policy == "stream"
        with pytest.raises(blsshm.BlsTypeError, match="copy_policy must be a str, .* got NoneType"):
            a.copy_policy = None  # a wrong type, as a timeout of "1" is
        send = np.arange(40000, dtype=np.uint8)
        for comm in (a, b):
            comm.post(0, send, [20000, 20000])
        for comm in (a, b):
            got, _ = comm.complete(0)
            assert np.array_equal(got, np.concatenate([send[:20000], send[:20000]]
                                                      if comm.rank == 0 else [send[20000:]] * 2))


def test_setting_the_policy_forgets_what_auto_measured():
    a, b = _pair()
    with a, b:
        send = np.zeros(2 * 32768, np.uint8)
        for t in range(2):
            for comm in (a, b):
                comm.post(t, send, [32768, 32768])
            for comm in (a, b):
                comm.complete(t)
        assert all(x > 0 for x in a._copy_estimates())
        a.copy_policy = "auto"
        assert a._copy_estimates() == (0.0, 0.0)


def _streamed_posts(a, b, posts, costs, nbytes=32768):
    """Which of ``posts`` posts of ``nbytes`` from a to b a streamed, "auto" having measured ``costs`` before each."""
    send, empty = np.zeros(nbytes, np.uint8), np.zeros(0, np.uint8)
    streamed = []
    for t in range(posts):
        a._set_copy_estimates(*costs)
        before = a.stats["bytes_streamed"]
        a.post(t, send, [0, nbytes])
        b.post(t, empty, [0, 0])
        a.complete(t)
        b.complete(t)
        streamed.append(a.stats["bytes_streamed"] - before == nbytes)
    return streamed


@pytest.mark.parametrize("cached, stream, streams", [
    (1.0, 0.5, True), (1.0, 0.75, True), (1.0, 0.8, False), (0.5, 1.0, False),  # ns per byte
    (0.0, 1.0, False),   # cached stores not measured yet: measured first
    (1.0, 0.0, True),    # then streaming
])
def test_auto_uses_streaming_stores_when_they_cost_at_most_three_quarters(cached, stream, streams):
    a, b = _pair()
    with a, b:
        assert _streamed_posts(a, b, 10, (cached, stream)) == [streams] * 10


def test_auto_tries_the_dearer_copy_once_in_64_posts():
    # So a change of placement (cores that came to share a cache) is noticed.
    a, b = _pair()
    with a, b:
        streamed = _streamed_posts(a, b, 128, (1.0, 0.1))
        assert [t for t, s in enumerate(streamed) if not s] == [63, 127]
