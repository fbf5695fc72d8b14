"""Direct reads: a blocking alltoallv offers large blocks, receivers copy them
straight from the sender's send buffer (process_vm_readv); see BLS_DIRECT_* in
blsshm/_layout.h.  Results must be exactly those of the record path, whoever
wins each hand-over, and a sender or receiver that fails mid-way must never
leave a peer hanging or reading a buffer that changed."""
import ctypes
import multiprocessing
import os
import re
import signal
import threading
import time

import numpy as np
import pytest

import blsshm
from blsshm import _core, _proc
from harness import Ranks, process_state, wait_until_published
from payload import counts_matrix, expected_recv, send_buffer

pytestmark = pytest.mark.timeout(120)

ALL_SOURCES = 2**64 - 1  # for _core._fail_direct_reads: a bit per source rank


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
        _core._fail_direct_reads(ALL_SOURCES)  # as ptrace rules would refuse it
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


def _block_of(src, dst, t):
    return np.full(BLOCK, 1000.0 * src + 10.0 * dst + t)


def _send(src, size, t):
    return np.concatenate([_block_of(src, d, t) for d in range(size)])


def _received(dst, size, t):
    return np.concatenate([_block_of(s, dst, t) for s in range(size)])


def _stop(pid):
    os.kill(pid, signal.SIGSTOP)
    while process_state(pid) != "T":
        time.sleep(0.001)


def _offer_and_wait(comm):
    """A rank that offers its blocks in a blocking alltoallv and waits there for the last rank."""
    recv, _ = comm.alltoallv(_send(comm.rank, comm.size, 0), [BLOCK] * comm.size)
    return "exact" if np.array_equal(recv, _received(comm.rank, comm.size, 0)) else "wrong"


def _stop_the_offerers(comm):
    """The last rank: once every other rank has offered, stop them all in their wait."""
    pids = []
    for r in range(comm.size - 1):
        wait_until_published(comm, r, 1)
        pid = comm._peer_pids()[r][0]  # once it posted: it has attached, so this is its pid
        assert pid > 0, pid  # never 0: a signal to pid 0 goes to the whole process group
        _stop(pid)
        pids.append(pid)
    return pids


def _reads_from_a_sender_killed_after_offering(comm):
    if comm.rank == 0:
        return _offer_and_wait(comm)
    (pid0,) = _stop_the_offerers(comm)
    comm.post(0, _send(1, 2, 0), [BLOCK, BLOCK])
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
    # Its block was never in its record: the direct read finds the process
    # gone, and the wait for the record to be filled finds it dead.
    with Ranks(_reads_from_a_sender_killed_after_offering, 2, arena_bytes=8 << 20) as ranks:
        outcomes = ranks.collect(1, timeout=30)
    status, value = outcomes[1]
    assert status == "ok", value
    name, lost, seconds = value
    assert (name, lost) == ("PeerLostError", 0)
    assert seconds < 2


def _retries_after_waiting_for_a_stopped_sender(comm):
    if comm.rank == 0:
        return _offer_and_wait(comm)
    (pid0,) = _stop_the_offerers(comm)
    _core._fail_direct_reads(ALL_SOURCES)  # so rank 1 needs rank 0 to copy its block to the record
    try:
        comm.alltoallv(_send(1, 2, 0), [BLOCK, BLOCK], timeout=0.3)
    except blsshm.BlsTimeoutError as exc:
        timeout = (isinstance(exc, TimeoutError), tuple(exc.waiting_for), str(exc))
    else:
        timeout = None
    finally:
        os.kill(pid0, signal.SIGCONT)
    # Nothing was consumed: the iteration stays posted, and completing it
    # gets every block, this rank's own (taken from send in the failed call) too.
    recv, counts = comm.complete(0)
    return timeout, np.array_equal(recv, _received(1, 2, 0)), counts.tolist()


def test_a_receiver_that_times_out_waiting_for_a_sender_to_fill_its_record_can_retry():
    with Ranks(_retries_after_waiting_for_a_stopped_sender, 2, arena_bytes=8 << 20, timeout=30) as ranks:
        outcomes = ranks.collect(2, timeout=60)
    assert outcomes[0] == ("ok", "exact"), outcomes[0]
    status, value = outcomes[1]
    assert status == "ok", value
    (is_timeout_error, waiting_for, message), exact, counts = value
    assert is_timeout_error and waiting_for == (0,), message
    assert "to copy its block of iteration 0 to its record" in message
    assert exact and counts == [BLOCK, BLOCK]


def _times_out_after_reading_a_block_directly(comm):
    if comm.rank < 2:
        return _offer_and_wait(comm)
    pid0, pid1 = _stop_the_offerers(comm)
    _core._fail_direct_reads(1 << 0)  # rank 1's block is read directly, rank 0's must be filled
    comm.post(0, _send(2, 3, 0), [BLOCK] * 3)
    try:
        comm.complete(0, timeout=0.3)
    except blsshm.BlsTimeoutError as exc:
        timeout = (tuple(exc.waiting_for), str(exc))
    else:
        timeout = None
    finally:
        os.kill(pid0, signal.SIGCONT)
        os.kill(pid1, signal.SIGCONT)
    try:
        comm.complete(0)
    except blsshm.CommAborted as exc:
        return timeout, comm.stats["bytes_read_direct"], str(exc)
    return timeout, comm.stats["bytes_read_direct"], "completed"


def test_a_receiver_that_read_a_block_directly_and_then_times_out_aborts_the_communicator():
    # The block it read went to the out of the failed call: a retry could not read it again.
    with Ranks(_times_out_after_reading_a_block_directly, 3, arena_bytes=8 << 20, timeout=30) as ranks:
        outcomes = ranks.collect(3, timeout=60)
    status, value = outcomes[2]
    assert status == "ok", value
    (waiting_for, message), read_direct, retried = value
    assert waiting_for == (0,) and "cannot be retried" in message, message
    assert read_direct == BLOCK * 8
    assert "rank 2: left complete(0) during a direct copy with rank 0 (timed out)" in retried, retried
    for rank in (0, 1):  # woken, they finish the iteration (every block had arrived) or see the abort
        assert outcomes[rank] == ("ok", "exact") or outcomes[rank][1][0] == "CommAborted", outcomes[rank]


def _abandons_a_claimed_read(comm, reader_done):
    """Rank 0 offers and times out waiting for rank 1's read of its block; rank 1 holds that read."""
    if comm.rank == 0:
        try:
            comm.alltoallv(_send(0, 2, 0), [BLOCK, BLOCK], timeout=2.0)
        except blsshm.BlsError as exc:
            outcome = (type(exc).__name__, isinstance(exc, TimeoutError), str(exc))
        else:
            outcome = "completed"
        # Stay alive until the reader is done: gone, we would be a lost
        # peer to it, and the abandoned claim would not be what it sees.
        reader_done.wait(60)
        return outcome
    (pid0,) = _stop_the_offerers(comm)  # so rank 0 cannot take its offer back before we claim it
    _core._stall_direct_claims(1 << 0, 30.0)

    def resume_rank_0_once_claimed():
        while _core._direct_claims_stalled() == 0:
            time.sleep(0.001)
        os.kill(pid0, signal.SIGCONT)

    resumer = threading.Thread(target=resume_rank_0_once_claimed, daemon=True)
    resumer.start()
    try:
        comm.alltoallv(_send(1, 2, 0), [BLOCK, BLOCK])
    except blsshm.CommAborted as exc:
        outcome = ("CommAborted", comm.stats["bytes_read_direct"], str(exc))
    else:
        outcome = "completed"
    finally:
        os.kill(pid0, signal.SIGCONT)  # in case the claim never came
        reader_done.set()
    resumer.join(5)
    return outcome, _core._direct_claims_stalled()


def test_a_sender_that_gives_up_on_a_read_under_way_abandons_it_and_the_reader_raises():
    # The sender's buffer may change once it returns: the reader must not
    # return what it read, even though its read succeeded.
    reader_done = multiprocessing.get_context("fork").Event()
    with Ranks(_abandons_a_claimed_read, 2, arena_bytes=8 << 20, args=(reader_done,), timeout=30) as ranks:
        outcomes = ranks.collect(2, timeout=90)
    status, value = outcomes[0]
    assert status == "ok", value
    name, is_timeout_error, message = value
    assert is_timeout_error and "waiting for rank 1 to finish a direct copy" in message, (name, message)
    assert "the communicator is aborted" in message, message
    status, value = outcomes[1]
    assert status == "ok", value
    (name, read_direct, message), claims_held = value
    assert claims_held == 1
    assert name == "CommAborted" and read_direct == 0, message  # it read, but does not count what it read
    assert "aborted by rank 0: left alltoallv() (iteration 0) during a direct copy with rank 1" in message, message


def _reads_on_while_another_rank_aborts(comm, claimed, aborted):
    """Rank 1 holds a read of rank 0's block; rank 2, which posted, aborts meanwhile."""
    P, me = comm.size, comm.rank
    if me == 2:
        comm.post(0, _send(2, P, 0), [BLOCK] * P)  # a split post offers nothing
        claimed.wait(60)
        comm.abort("rank 2 gives up")
        aborted.set()
        return "aborted"
    if me == 1:
        comm.direct_min_bytes = 0  # offers nothing: rank 0's offers are the only ones
        wait_until_published(comm, 0, 1)
        pid0 = comm._peer_pids()[0][0]  # it posted: it has attached, so this is its pid
        assert pid0 > 0, pid0  # never 0: a signal to pid 0 goes to the whole process group
        _stop(pid0)  # so rank 0 cannot take its offer back before we claim it
        _core._stall_direct_claims(1 << 0, 30.0)

        def abort_during_the_read():
            while _core._direct_claims_stalled() == 0:
                time.sleep(0.001)
            os.kill(pid0, signal.SIGCONT)
            claimed.set()
            aborted.wait(60)
            time.sleep(0.2)  # rank 0 meets the abort while it waits for our read
            _core._stall_direct_claims(1 << 0, 0.0)  # the read goes on

        helper = threading.Thread(target=abort_during_the_read, daemon=True)
        helper.start()
    try:
        recv, _ = comm.alltoallv(_send(me, P, 0), [BLOCK] * P)
        first = "exact" if np.array_equal(recv, _received(me, P, 0)) else "wrong"
    except blsshm.BlsError as exc:
        first = f"{type(exc).__name__}: {exc}"
    finally:
        if me == 1:
            os.kill(pid0, signal.SIGCONT)  # in case the claim never came
            _core._stall_direct_claims(0, 0.0)
            helper.join(5)
    try:
        comm.alltoallv(_send(me, P, 1), [BLOCK] * P)
    except blsshm.CommAborted:
        second = "CommAborted"
    else:
        second = "completed"
    return first, second, comm.stats["bytes_read_direct"]


def test_a_read_under_way_when_another_rank_aborts_ends_and_both_sides_complete_the_iteration():
    # Every block of iteration 0 had arrived: as Comm.abort promises, it
    # completes, also for the sender waiting on the read and for its reader.
    ctx = multiprocessing.get_context("fork")
    claimed, aborted = ctx.Event(), ctx.Event()
    with Ranks(_reads_on_while_another_rank_aborts, 3, arena_bytes=8 << 20, args=(claimed, aborted),
               timeout=30) as ranks:
        outcomes = ranks.collect(3, timeout=90)
    assert outcomes[2] == ("ok", "aborted"), outcomes[2]
    assert outcomes[0] == ("ok", ("exact", "CommAborted", 0)), outcomes[0]
    assert outcomes[1] == ("ok", ("exact", "CommAborted", BLOCK * 8)), outcomes[1]  # read directly


PR_SET_PTRACER = 0x59616D61
PR_SET_PTRACER_ANY = ctypes.c_ulong(-1).value


def _record_prctl_calls(monkeypatch, tmp_path, scope):
    """Point allow_peer_reads at a Yama scope of ``scope`` (None: no Yama); the prctl calls it makes."""
    calls = []
    path = tmp_path / "ptrace_scope"
    if scope is not None:
        path.write_text(scope)
    monkeypatch.setattr(_proc, "YAMA_PTRACE_SCOPE", str(path))
    monkeypatch.setattr(_proc, "_libc_prctl",
                        lambda *args: calls.append(tuple(getattr(a, "value", a) for a in args)) or 0)
    monkeypatch.setattr(_proc, "_peer_reads_allowed_in", None)
    return calls


@pytest.mark.parametrize("scope, declared", [("1\n", True), ("0\n", False), ("2\n", False), ("3\n", False),
                                             (None, False)])
def test_a_process_lets_any_process_trace_it_only_under_yama_scope_1(monkeypatch, tmp_path, scope, declared):
    # Scope 1 refuses siblings unless the process read declares them; 2 and 3
    # admit no such exception, and 0 or no Yama needs none.
    calls = _record_prctl_calls(monkeypatch, tmp_path, scope)
    assert _proc.allow_peer_reads() == declared
    assert calls == ([(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0)] if declared else [])
    assert not _proc.allow_peer_reads()  # once per process
    assert len(calls) == (1 if declared else 0)
    monkeypatch.setattr(_proc, "_peer_reads_allowed_in", os.getpid() + 1)  # as in a forked child
    assert _proc.allow_peer_reads() == declared


@pytest.mark.parametrize("value, policy", [(None, "any"), ("", "any"), (" ANY ", "any"), ("keep", "keep")])
def test_blsshm_ptracer_names_the_policy(monkeypatch, value, policy):
    if value is None:
        monkeypatch.delenv("BLSSHM_PTRACER", raising=False)
    else:
        monkeypatch.setenv("BLSSHM_PTRACER", value)
    assert blsshm.comm.ptracer_policy() == policy


def test_a_bad_blsshm_ptracer_is_refused_before_a_segment_is_made(monkeypatch):
    monkeypatch.setenv("BLSSHM_PTRACER", "off")
    made = []
    monkeypatch.setattr(blsshm.segment, "_create", lambda *args: made.append(args))
    with pytest.raises(blsshm.BlsValueError, match="BLSSHM_PTRACER must be 'any' .* or 'keep', got 'off'"):
        blsshm.Comm.create(1)
    assert made == []


@pytest.mark.parametrize("value, error, words", [
    (1.5, blsshm.BlsTypeError, "a whole number of bytes, got 1.5"),
    (True, blsshm.BlsTypeError, "a whole number of bytes, got True"),
    (None, blsshm.BlsTypeError, "a whole number of bytes, got None"),
    ("32K", blsshm.BlsTypeError, "a whole number of bytes, got '32K'"),
    (-1, blsshm.BlsValueError, "must be >= 0 (0 turns direct reads off), got -1")])
def test_a_bad_direct_min_bytes_is_refused_and_the_old_one_kept(value, error, words):
    # 1.5 and True were taken as 1 (every block offered), -1 was an OverflowError.
    with blsshm.Comm.create(1) as comm:
        comm.direct_min_bytes = 4096
        with pytest.raises(error, match=re.escape(words)):
            comm.direct_min_bytes = value
        assert comm.direct_min_bytes == 4096
        comm.direct_min_bytes = np.int64(0)  # any integer
        assert comm.direct_min_bytes == 0
        comm.direct_min_bytes = 1 << 70  # more than any block: offers none
        assert comm.direct_min_bytes == (1 << 64) - 1


_prctl_calls = []


def _pretend_yama_scope_1(path, policy):
    def setup(rank):
        os.environ["BLSSHM_PTRACER"] = policy
        _proc.YAMA_PTRACE_SCOPE = path
        real_prctl = _proc._libc_prctl  # still called: under a real scope 1 the reads need it

        def recording_prctl(*args):
            _prctl_calls.append(args[0])
            return real_prctl(*args)
        _proc._libc_prctl = recording_prctl
    return setup


def _report_prctl_calls_as_blocks_grow(comm):
    small = np.arange(comm.size, dtype=np.float64)  # one element per pair: never offered
    comm.alltoallv(small, [1] * comm.size)
    calls_before_an_offer = list(_prctl_calls)
    exact = []
    for t in (1, 2):  # offered (declared before the first only)
        recv, _ = comm.alltoallv(_send(comm.rank, comm.size, t), [BLOCK] * comm.size)
        exact.append(np.array_equal(recv, _received(comm.rank, comm.size, t)))
    return calls_before_an_offer, exact, list(_prctl_calls)


@pytest.mark.parametrize("policy", ["any", "keep"])
def test_a_rank_declares_the_exception_once_before_its_first_offer(tmp_path, policy):
    path = tmp_path / "ptrace_scope"
    path.write_text("1\n")
    with Ranks(_report_prctl_calls_as_blocks_grow, 2, arena_bytes=8 << 20,
               setup=_pretend_yama_scope_1(str(path), policy)) as ranks:
        outcomes = ranks.collect(2, timeout=60)
    for rank in (0, 1):
        status, value = outcomes[rank]
        assert status == "ok", value
        calls_before_an_offer, exact, calls = value
        assert calls_before_an_offer == [] and exact == [True, True], value
        assert calls == ([PR_SET_PTRACER] if policy == "any" else []), value
