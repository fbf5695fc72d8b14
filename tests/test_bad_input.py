"""DESIGN §5: bad input raises a named error before anything is published,
and the communicator still works afterwards."""
import decimal
import re

import numpy as np
import pytest

import blsshm
from blsshm import ArenaFullError, BlsError, BlsTypeError, BlsValueError

pytestmark = pytest.mark.timeout(60)

GOOD = np.arange(4, dtype=np.float32)


def _bad_posts():
    """(label, call(comm), expected exception, words the message must contain)."""
    strided = np.arange(8, dtype=np.float32)[::2]
    return [
        ("too few counts", lambda c: c.post(0, GOOD, [4]), BlsValueError, ["1 entries", "2 ranks"]),
        ("too many counts", lambda c: c.post(0, GOOD, [1, 1, 2]), BlsValueError, ["3 entries"]),
        ("negative count", lambda c: c.post(0, GOOD, [5, -1]), BlsValueError, ["send_counts[1]", "negative"]),
        ("float count", lambda c: c.post(0, GOOD, [2.0, 2]), BlsTypeError, ["send_counts[0]", "integer"]),
        ("bool count", lambda c: c.post(0, GOOD, [True, 3]), BlsTypeError, ["send_counts[0]", "integer"]),
        ("counts in a set", lambda c: c.post(0, GOOD, {1, 3}), BlsTypeError, ["sequence", "set"]),
        ("counts in a dict", lambda c: c.post(0, GOOD, {"a": 1, "b": 3}), BlsTypeError, ["sequence", "dict"]),
        ("counts in a dict keyed by rank", lambda c: c.post(0, GOOD, {0: 1, 1: 3}), BlsTypeError,
         ["sequence", "dict"]),
        ("counts in bytes", lambda c: c.post(0, GOOD, b"\x01\x03"), BlsTypeError, ["sequence", "bytes"]),
        ("counts not a sequence", lambda c: c.post(0, GOOD, 4), BlsTypeError, ["sequence"]),
        ("counts in a 0-d array", lambda c: c.post(0, GOOD, np.array(4)), BlsValueError,
         ["one-dimensional", "shape ()"]),
        # Arrays of int64 or int32 are read in place: their bad counts must still be named.
        ("negative count in an int64 array", lambda c: c.post(0, GOOD, np.array([5, -1])), BlsValueError,
         ["send_counts[1]", "negative"]),
        ("negative count in an int32 array", lambda c: c.post(0, GOOD, np.array([-1, 5], np.int32)),
         BlsValueError, ["send_counts[0]", "negative"]),
        ("too few counts in an int64 array", lambda c: c.post(0, GOOD, np.array([4])), BlsValueError,
         ["1 entries", "2 ranks"]),
        ("counts in a bool array", lambda c: c.post(0, GOOD, np.array([True, True])), BlsTypeError,
         ["integers", "bool"]),
        ("counts in a float array", lambda c: c.post(0, GOOD, np.array([2.0, 2.0])), BlsTypeError,
         ["integers", "float64"]),
        ("counts in a 2-d array", lambda c: c.post(0, GOOD, np.array([[1], [3]])), BlsValueError,
         ["one-dimensional", "shape (2, 1)"]),
        ("float count array", lambda c: c.post(0, GOOD, np.array([2.0, 2.0])), BlsTypeError, ["integers"]),
        ("counts exceed data", lambda c: c.post(0, GOOD, [3, 3]), BlsValueError, ["6 elements", "holds 4"]),
        ("counts short of data", lambda c: c.post(0, GOOD, [1, 1]), BlsValueError, ["2 elements", "holds 4"]),
        ("counts adding up past 2**64", lambda c: c.post(0, np.zeros(0, np.uint8), [2 ** 63 - 1] * 2),
         BlsValueError, [f"{2 ** 64 - 2} elements", "holds 0"]),
        ("record bigger than arena", lambda c: c.post(0, np.zeros(20000, np.float64), [10000, 10000]),
         ArenaFullError, ["fit in the arena", "arena_bytes"]),
        ("non-contiguous", lambda c: c.post(0, strided, [2, 2]), BlsValueError, ["contiguous"]),
        ("object dtype", lambda c: c.post(0, np.array([1, "a"], dtype=object), [1, 1]), BlsTypeError, ["object"]),
        ("not an array", lambda c: c.post(0, [1.0, 2.0], [1, 1]), BlsTypeError, ["numpy array", "list"]),
        ("iteration skipped", lambda c: c.post(1, GOOD, [2, 2]), BlsValueError, ["post(1)", "is 0"]),
        ("negative iteration", lambda c: c.post(-1, GOOD, [2, 2]), BlsValueError, ["post(-1)"]),
        ("float iteration", lambda c: c.post(0.5, GOOD, [2, 2]), BlsTypeError, ["iteration", "float"]),
        ("string iteration", lambda c: c.post("0", GOOD, [2, 2]), BlsTypeError, ["iteration", "str"]),
        ("bool iteration", lambda c: c.post(False, GOOD, [2, 2]), BlsTypeError, ["iteration", "bool"]),
        ("0-d bool array iteration", lambda c: c.post(np.array(False), GOOD, [2, 2]), BlsTypeError,
         ["iteration", "ndarray"]),
        ("0-d float array iteration", lambda c: c.post(np.array(0.5), GOOD, [2, 2]), BlsTypeError,
         ["iteration", "0.5"]),
        ("huge iteration", lambda c: c.post(2 ** 64, GOOD, [2, 2]), BlsValueError, ["out of range"]),
        ("float iteration to complete", lambda c: c.complete(0.0), BlsTypeError, ["iteration", "float"]),
        ("None iteration to arrived", lambda c: c.arrived(None), BlsTypeError, ["iteration", "NoneType"]),
        ("float iteration, zero copy", lambda c: c.post_views(0.0, [2, 2]), BlsTypeError, ["iteration"]),
        ("string iteration, zero copy", lambda c: c.complete_views("0"), BlsTypeError, ["iteration"]),
        ("complete before post", lambda c: c.complete(0), BlsValueError, ["before post(0)"]),
        ("negative timeout", lambda c: c.post(0, GOOD, [2, 2], timeout=-1), BlsValueError, ["timeout"]),
        # A bool is an int: True was taken for 1 s, as Comm.create refuses it.
        ("bool timeout", lambda c: c.post(0, GOOD, [2, 2], timeout=True), BlsTypeError, ["timeout", "True"]),
        ("numpy bool timeout", lambda c: c.post(0, GOOD, [2, 2], timeout=np.True_), BlsTypeError,
         ["timeout", "True"]),
        ("timeout beyond any float", lambda c: c.post(0, GOOD, [2, 2], timeout=-10 ** 400), BlsValueError,
         ["timeout"]),
        # Comm.create refuses these; a call's timeout took them as seconds.
        ("Decimal timeout", lambda c: c.post(0, GOOD, [2, 2], timeout=decimal.Decimal(1)), BlsTypeError,
         ["timeout", "Decimal"]),
        ("0-d array timeout", lambda c: c.post(0, GOOD, [2, 2], timeout=np.array(1.0)), BlsTypeError,
         ["timeout", "array"]),
        ("zero-copy bad counts", lambda c: c.post_views(0, [1, -2]).__enter__(), BlsValueError, ["negative"]),
        ("zero-copy bad dtype", lambda c: c.post_views(0, [1, 1], object).__enter__(), BlsTypeError, ["object"]),
    ]


def _check_bad_posts(comm):
    seen = []

    def own_counters():
        published, completed = comm._counters()
        return published[comm.rank], completed[comm.rank]

    for label, call, exc_type, words in _bad_posts():
        before = own_counters()
        try:
            call(comm)
            seen.append((label, "no error"))
            continue
        except BlsError as exc:
            ok = isinstance(exc, exc_type) and all(w in str(exc) for w in words)
            seen.append((label, "ok" if ok else f"{type(exc).__name__}: {exc}"))
        if own_counters() != before or comm.next_post != 0:
            seen.append((label, "published something"))
    # Still works, and what arrives is exact.
    recv, counts = comm.alltoallv(GOOD + 10 * comm.rank, [2, 2])
    seen.append(("afterwards", recv.tolist(), counts.tolist()))
    return seen


def test_bad_post_arguments_raise_before_publishing():
    results = blsshm.spawn(_check_bad_posts, 2, arena_bytes=4096)
    for me, seen in enumerate(results):
        *checks, after = seen
        assert [c for c in checks if c[1] != "ok"] == []
        assert after == ("afterwards", [2 * me, 2 * me + 1, 10 + 2 * me, 11 + 2 * me], [2, 2])


def _check_bad_completes(comm):
    seen = []
    comm.post(0, np.arange(4, dtype=np.int64), [2, 2])
    for label, kwargs, exc_type in [
        ("out too small", dict(out=np.empty(3, np.int64)), BlsValueError),
        ("out wrong dtype", dict(out=np.empty(4, np.float64)), BlsTypeError),
        ("out read-only", dict(out=np.frombuffer(bytes(32), np.int64)), BlsValueError),
        ("out not an array", dict(out=bytearray(32)), BlsTypeError),
    ]:
        try:
            comm.complete(0, **kwargs)
            seen.append((label, "no error"))
        except exc_type:
            seen.append((label, "ok" if comm.next_complete == 0 else "completed anyway"))
    try:
        comm.complete(1)
        seen.append(("wrong iteration", "no error"))
    except BlsValueError as exc:
        seen.append(("wrong iteration", "ok" if "next iteration to complete is 0" in str(exc) else str(exc)))
    recv, _ = comm.complete(0, out=np.empty(4, np.int64))  # the retry works
    seen.append(("retry", recv.tolist()))
    return seen


def test_bad_complete_arguments_leave_the_iteration_to_retry():
    for me, seen in enumerate(blsshm.spawn(_check_bad_completes, 2)):
        *checks, retry = seen
        assert [c for c in checks if c[1] != "ok"] == []
        assert retry == ("retry", [2 * me, 2 * me + 1] * 2)


def _arena_too_small_for_lag(comm):
    # lag 2 with room for one 3 KiB record: the second post cannot fit next to
    # the first until this rank completes it, which post() must not wait for.
    comm.post(0, np.zeros(384, np.float64), [384])
    try:
        comm.post(1, np.zeros(384, np.float64), [384])
        return "no error"
    except ArenaFullError as exc:
        msg = str(exc)
    comm.complete(0)
    comm.post(1, np.zeros(384, np.float64), [384])  # fits once 0 is completed
    comm.complete(1)
    return msg


def test_arena_too_small_for_the_lag_is_a_clear_error():
    msg = blsshm.spawn(_arena_too_small_for_lag, 1, lag=2, arena_bytes=4096)[0]
    assert "does not fit" in msg and "arena_bytes" in msg


def _dtype_mismatch(comm):
    send = np.zeros(2, np.float32 if comm.rank == 0 else np.float64)
    try:
        comm.alltoallv(send, [1, 1])
    except blsshm.CommAborted as exc:
        return str(exc)
    return "no error"


def test_mismatched_dtypes_abort_everyone_instead_of_hanging():
    messages = blsshm.spawn(_dtype_mismatch, 2)
    for msg in messages:
        assert "dtype mismatch" in msg
    # Both may see the mismatch; each named itself as the aborter, though only one was.
    assert messages[0] == messages[1]


@pytest.mark.parametrize("kwargs, exc_type", [
    (dict(size=0), BlsValueError),
    (dict(size=2, rank=2), BlsValueError),
    (dict(size=2, lag=-1), BlsValueError),
    (dict(size=2, arena_bytes=10), BlsValueError),
    (dict(size=2.0), BlsTypeError),
    (dict(size=2, lag="1"), BlsTypeError),
])
def test_bad_communicator_arguments(kwargs, exc_type):
    with pytest.raises(exc_type):
        blsshm.Comm.create(**kwargs)


def test_full_dev_shm_is_a_clean_error():
    with pytest.raises(BlsError, match="cannot reserve"):
        blsshm.Comm.create(2, arena_bytes=1 << 40)  # 2 TiB: more than /dev/shm holds


@pytest.mark.parametrize("argument, error", [
    ({"timeout": "x"}, BlsTypeError), ({"attach_timeout": -1}, BlsValueError),
    ({"spin_us": "5"}, BlsTypeError), ({"spin_us": -1}, BlsValueError)])
def test_create_checks_its_arguments_before_it_makes_a_segment(argument, error, monkeypatch):
    """A 2 TiB arena cannot be reserved: the argument's error, not that one, says what is wrong."""
    made = []
    monkeypatch.setattr(blsshm.segment, "_create", lambda *args: made.append(args))
    with pytest.raises(error, match=next(iter(argument))):
        blsshm.Comm.create(2, arena_bytes=1 << 40, **argument)
    assert made == []


@pytest.mark.parametrize("name", [123, None, b"/blsshm-" + b"0" * 32])
def test_a_name_that_is_not_a_string_is_a_type_error(name):
    with pytest.raises(BlsTypeError, match="a segment name is a str"):
        blsshm.Comm.attach(name, 0)


def test_attach_to_a_missing_segment():
    with pytest.raises(BlsError, match="does not exist"):
        blsshm.Comm.attach("/blsshm-" + "0" * 32, 0)
    with pytest.raises(BlsValueError, match="not a blsshm segment name"):
        blsshm.Comm.attach("/etc/passwd", 0)


@pytest.mark.parametrize("name", ["/blsshm-" + "0" * 31 + "\x00",  # posix_ipc crashed on it
                                  "/blsshm-a/b", "/blsshm-" + "0" * 32 + "/x", "/blsshm-" + "A" * 32,
                                  "/blsshm-" + "0" * 33, "blsshm-" + "0" * 32])
def test_a_name_blsshm_never_makes_is_refused_before_the_kernel_sees_it(name):
    with pytest.raises(BlsValueError, match="not a blsshm segment name"):
        blsshm.Comm.attach(name, 0)


def test_a_segment_that_cannot_be_opened_is_a_clean_error(monkeypatch):
    import posix_ipc

    def refuse(*_args, **_kwargs):
        raise posix_ipc.PermissionsError("Permission denied")  # another user's segment (mode 0600)
    monkeypatch.setattr(posix_ipc, "SharedMemory", refuse)
    with pytest.raises(BlsError, match="cannot open segment /blsshm-0{32}: Permission denied"):
        blsshm.Comm.attach("/blsshm-" + "0" * 32, 0)


def test_attaching_the_same_rank_twice_is_refused():
    with blsshm.Comm.create(2, rank=0) as first:
        with pytest.raises(BlsValueError, match="already attached"):
            blsshm.Comm.attach(first.name, 0)
        second = blsshm.Comm.attach(first.name, 1)
        second.close()


def test_init_outside_the_launcher_says_how_to_start(monkeypatch):
    for name in ("BLSSHM_NAME", "BLSSHM_SIZE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.delenv("BLSSHM_RANK", raising=False)
    with pytest.raises(BlsError, match=r"python -m blsshm.run.*\(BLSSHM_RANK not set\)"):
        blsshm.init()


@pytest.mark.parametrize("variable, value, words", [
    ("BLSSHM_RANK", "x", "BLSSHM_RANK='x' is not an integer in [0, 1]"),
    ("BLSSHM_RANK", "2", "BLSSHM_RANK='2' is not an integer in [0, 1] (BLSSHM_SIZE=2)"),  # "rank must be in [0, 2)"
    ("BLSSHM_RANK", "1_0", "BLSSHM_RANK='1_0' is not an integer in [0, 1]"),  # int() took it as 10
    ("BLSSHM_RANK", " 1", "BLSSHM_RANK=' 1' is not an integer in [0, 1]"),
    ("BLSSHM_SIZE", "0", "BLSSHM_SIZE='0' is not an integer in [1, 4096]"),
    ("BLSSHM_SIZE", "9" * 20, "is not an integer in [1, 4096]"),
    ("BLSSHM_SIZE", "9" * 5000, "is not an integer in [1, 4096]"),  # int()'s own ValueError came out
    ("BLSSHM_SIZE", "3", "BLSSHM_SIZE is 3 but the segment has 2 ranks")])
def test_init_names_a_garbled_variable_before_the_rank_is_claimed(variable, value, words, monkeypatch):
    # The size was compared after attaching: the rank was taken (and, for the
    # last rank, the name unlinked), and the peers saw it close.
    monkeypatch.setattr(blsshm, "_initialized", None)
    with blsshm.Comm.create(2, 0) as creator:
        good = {"BLSSHM_NAME": creator.name, "BLSSHM_RANK": "1", "BLSSHM_SIZE": "2"}
        for name, setting in {**good, variable: value}.items():
            monkeypatch.setenv(name, setting)
        with pytest.raises(BlsValueError, match=re.escape(words)):
            blsshm.init(attach_timeout=5)
        monkeypatch.setenv(variable, good[variable])
        with blsshm.init(attach_timeout=5) as joined:  # rank 1 is still free
            assert joined.rank == 1


def test_attaching_to_an_empty_file_says_it_is_not_a_segment():
    # mmap's bare "ValueError: cannot mmap an empty file" came out.
    import posix_ipc
    from blsshm import segment
    name = segment.PREFIX + "0" * 32
    posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600).close_fd()
    try:
        with pytest.raises(BlsValueError, match=f"not a blsshm segment: {name} is empty"):
            blsshm.Comm.attach(name, 0)
    finally:
        posix_ipc.unlink_shared_memory(name)


def test_close_is_idempotent_and_calls_after_close_raise():
    comm = blsshm.Comm.create(1)
    comm.alltoallv(GOOD, [4])
    comm.close()
    comm.close()
    assert comm.closed
    with pytest.raises(BlsError, match="closed"):
        comm.alltoallv(GOOD, [4])
    assert comm.stats["iterations_completed"] == 1


def test_comm_cannot_be_pickled():
    import pickle
    with blsshm.Comm.create(1) as comm:
        with pytest.raises(TypeError, match="attach"):
            pickle.dumps(comm)


def _zero_copy_misuse(comm):
    seen = []
    try:  # sizes that overflow 64-bit arithmetic must not become huge views
        with comm.post_views(0, [2 ** 47 - 1, 2], "V65536"):
            seen.append("views handed out")
    except ArenaFullError:
        seen.append("ok")
    try:
        with comm.post_views(0, [2 ** 64, 1], np.uint8):
            seen.append("views handed out")
    except ArenaFullError:
        seen.append("ok")
    # Named as the call made: alltoallv takes no iteration.
    for name, call in ((r"post\(0\)", lambda: comm.post(0, GOOD, [2, 2])),
                       (r"alltoallv\(\) \(iteration 0\)", lambda: comm.alltoallv(GOOD, [2, 2]))):
        with pytest.raises(BlsValueError, match=rf"^{name} inside an open post_views\(0\) block$"):
            with comm.post_views(0, [1, 1], np.float32) as views:
                call()
    with comm.post_views(0, [2, 2], np.float32) as views:
        for v in views:
            v[:] = comm.rank
    try:
        views[0][0] = 99  # published: writing now would tear what peers read
        seen.append("still writable")
    except ValueError:
        seen.append("ok")
    recv, _ = comm.complete(0)
    seen.append(recv.tolist())
    return seen


def test_zero_copy_misuse_is_refused():
    for me, seen in enumerate(blsshm.spawn(_zero_copy_misuse, 2)):
        assert seen == ["ok", "ok", "ok", [0.0, 0.0, 1.0, 1.0]]


def _bad_out_in_blocking_call(comm):
    for out in (np.empty(4, np.float64), np.empty(8, np.float32)[::2], "no"):
        try:
            comm.alltoallv(GOOD, [2, 2], out=out)
        except (BlsTypeError, BlsValueError):
            pass
        assert comm.next_post == 0, "published before checking out="
    return comm.alltoallv(GOOD, [2, 2], out=np.empty(4, np.float32))[0].tolist()


def test_blocking_call_checks_out_before_publishing():
    assert blsshm.spawn(_bad_out_in_blocking_call, 2)[0] == [0.0, 1.0, 0.0, 1.0]


@pytest.mark.parametrize("out, exc_type, words", [
    (np.empty(4, np.float64), BlsTypeError, "out has dtype float64"),
    (np.empty(8, np.float32)[::2], BlsValueError, "out must be C-contiguous"),
    (np.frombuffer(bytes(16), np.float32), BlsValueError, "out is read-only"),
    (np.ma.zeros(4, np.float32), BlsTypeError, "out is a numpy masked array"),
    ("no", BlsTypeError, "out must be a numpy array")])
def test_complete_checks_out_before_waiting_for_the_blocks(out, exc_type, words):
    with blsshm.Comm.create(2, 0, timeout=10) as a, blsshm.Comm.attach(a.name, 1, timeout=10) as b:
        a.post(0, GOOD, [2, 2])
        with pytest.raises(exc_type, match=words):  # at once, not a BlsTimeoutError once b never posted
            a.complete(0, out=out)
        b.alltoallv(GOOD, [2, 2])
        assert a.complete(0, out=np.empty(4, np.float32))[0].tolist() == [0.0, 1.0, 0.0, 1.0]


def test_the_first_call_waits_for_ranks_to_attach_only_as_long_as_its_timeout():
    with blsshm.Comm.create(2, 0, attach_timeout=None) as a:
        for call in (lambda: a.post(0, GOOD, [2, 2], timeout=0.2), lambda: a.alltoallv(GOOD, [2, 2], timeout=0),
                     lambda: a.post_views(0, [2, 2], timeout=0.2)):  # complete's first: before post(0)
            with pytest.raises(blsshm.BlsTimeoutError, match=r"rank\(s\) \[1\] did not attach .*(the call's timeout)"):
                call()
        assert a.next_post == 0
    # Not the default timeout, a stall detector for the iterations: peers may be slow to start.
    with blsshm.Comm.create(2, 0, attach_timeout=0.5, timeout=0.05) as a:
        with pytest.raises(blsshm.BlsTimeoutError, match=r"within 0.5 s \(attach_timeout\)"):
            a.post(0, GOOD, [2, 2])
        with blsshm.Comm.attach(a.name, 1, timeout=10) as b:
            b.post(0, GOOD, [2, 2])
            assert a.alltoallv(GOOD, [2, 2], timeout=10)[0].tolist() == [0.0, 1.0, 0.0, 1.0]


FIRST_CALLS = [
    ("complete before post", lambda c: c.complete(0), BlsValueError, "complete(0) called before post(0)"),
    ("counts that do not add up", lambda c: c.post(0, GOOD, [1, 1]), BlsValueError, "add up to 2"),
    ("an iteration skipped", lambda c: c.post(3, GOOD, [2, 2]), BlsValueError,
     "post(3) called, but the next iteration to post is 0"),
    ("a zero-copy iteration skipped", lambda c: c.post_views(3, [2, 2]), BlsValueError,
     "post_views(3) called, but the next iteration to post is 0"),
    ("a bad zero-copy dtype", lambda c: c.post_views(0, [2, 2], "nonsense"), BlsTypeError, "not a dtype"),
    ("a negative zero-copy count", lambda c: c.post_views(0, [2, -2]), BlsValueError, "negative"),
    ("complete_views before post", lambda c: c.complete_views(0), BlsValueError,
     "complete_views(0) called before post(0)"),
    ("blocking counts that do not add up", lambda c: c.alltoallv(GOOD, [3, 3]), BlsValueError, "add up to 6"),
    ("a blocking out of another dtype", lambda c: c.alltoallv(GOOD, [2, 2], out=np.empty(4, np.int32)),
     BlsTypeError, "dtype int32"),
    ("a block too big for the arena", lambda c: c.post(0, np.zeros(8192, np.uint8), [0, 8192]),
     ArenaFullError, "send_counts[1] = 8192 elements of 1 bytes do not fit"),
    ("a zero-copy block too big for the arena", lambda c: c.post_views(0, [0, 8192], np.uint8),
     ArenaFullError, "send_counts[1] = 8192 elements of 1 bytes do not fit"),
]


@pytest.mark.parametrize("call, error, words", [f[1:] for f in FIRST_CALLS], ids=[f[0] for f in FIRST_CALLS])
def test_bad_input_to_the_first_call_is_named_before_waiting_for_peers_to_attach(call, error, words):
    # It was checked only after the wait: with a peer missing, the error
    # became a timeout naming the peer (with attach_timeout=None, a hang).
    with blsshm.Comm.create(2, 0, arena_bytes=4096, attach_timeout=1) as a:
        with pytest.raises(error, match=re.escape(words)):
            call(a)
        assert (a.next_post, a.next_complete) == (0, 0)
        with blsshm.Comm.attach(a.name, 1, timeout=10) as b:  # and it still works
            b.post(0, GOOD, [2, 2])
            assert a.alltoallv(GOOD, [2, 2], timeout=10)[0].tolist() == [0.0, 1.0, 0.0, 1.0]


def test_a_signal_handler_closing_the_communicator_during_the_first_wait_is_a_closed_error():
    # It was BlsValueError ("rank 0 is closed"), the error of bad input.
    import signal
    with blsshm.Comm.create(2, 0, attach_timeout=5) as a:
        previous = signal.signal(signal.SIGALRM, lambda *_: a.close())
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            with pytest.raises(BlsError) as caught:
                a.post(0, GOOD, [2, 2])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        assert not isinstance(caught.value, ValueError)
        assert "closed while waiting for every rank to attach" in str(caught.value)


def test_a_close_just_after_every_rank_attached_is_a_closed_error_too(monkeypatch):
    # Between the wait and the end of the first call's set-up (no sleep there,
    # so a rare window), a signal handler's close still gave BlsValueError.
    looked_up = blsshm.Comm._peer_pids

    def closed_meanwhile(comm):
        comm.close()  # as a signal handler arriving here would
        return looked_up(comm)

    with blsshm.Comm.create(2, 0, attach_timeout=5) as a, blsshm.Comm.attach(a.name, 1) as b:
        monkeypatch.setattr(blsshm.Comm, "_peer_pids", closed_meanwhile)
        with pytest.raises(BlsError, match="closed while waiting for every rank to attach") as caught:
            a.post(0, GOOD, [2, 2])
        assert not isinstance(caught.value, ValueError)
        monkeypatch.undo()
        assert b.closed is False


def test_completing_inside_an_open_complete_views_block_is_refused():
    """The senders could overwrite what the block's views still show."""
    with blsshm.Comm.create(2, 0, lag=1, timeout=10) as a, blsshm.Comm.attach(a.name, 1, timeout=10) as b:
        for t in (0, 1):
            for c in (a, b):
                c.post(t, np.full(2, 10 * c.rank + t, np.float64), [1, 1])
        with a.complete_views(0) as views:
            # Each names the call made, not the complete every one of them runs.
            for name, call in ((r"complete\(0\)", lambda: a.complete(0)),
                               (r"complete\(0\)", lambda: a.complete(0, out=np.empty(2))),
                               (r"complete_views\(0\)", lambda: a.complete_views(0).__enter__())):
                with pytest.raises(BlsValueError, match=rf"^{name} inside an open complete_views\(0\)"):
                    call()
            assert [v.tolist() for v in views] == [[0.0], [10.0]]
        assert a.next_complete == 1  # leaving the block completed it
        assert a.complete(1)[0].tolist() == [1.0, 11.0]
        for t in (0, 1):
            assert b.complete(t)[0].tolist() == [t, 10.0 + t]


@pytest.mark.parametrize("timeout, exc_type", [("soon", BlsTypeError), (float("nan"), BlsValueError),
                                               (-0.5, BlsValueError)])
def test_bad_timeouts(timeout, exc_type):
    with blsshm.Comm.create(1) as comm:
        with pytest.raises(exc_type, match="timeout"):
            comm.alltoallv(GOOD, [4], timeout=timeout)
        assert comm.alltoallv(GOOD, [4], timeout=float("inf"))[0].tolist() == GOOD.tolist()


@pytest.mark.parametrize("timeout, exc_type", [("soon", BlsTypeError), (float("nan"), BlsValueError),
                                               (-0.5, BlsValueError), (True, BlsTypeError),
                                               (np.True_, BlsTypeError), (decimal.Decimal(1), BlsTypeError)])
def test_a_bad_default_timeout_is_refused_when_set(timeout, exc_type):
    # It was kept, and the next call raised about a timeout it was never given.
    with blsshm.Comm.create(1, timeout=2.5) as comm:
        with pytest.raises(exc_type, match="timeout"):
            comm.timeout = timeout
        assert comm.timeout == 2.5
        comm.timeout = None
        assert comm.timeout is None and comm.alltoallv(GOOD, [4])[0].tolist() == GOOD.tolist()


def test_a_record_that_only_this_ranks_own_complete_could_make_room_for_is_refused_at_once():
    # Waiting could only time out (or, without a timeout, hang): the record
    # in the way is one this rank has to complete itself.
    creator = blsshm.Comm.create(2, lag=1, arena_bytes=1 << 20)
    other = blsshm.Comm.attach(creator.name, 1)
    try:
        n = 300_000  # bytes per rank: a record of 600 KB, two of which the arena cannot hold
        send = np.ones(2 * n, np.uint8)
        for comm in (other, creator):
            comm.post(0, send, [n, n])
        with pytest.raises(ArenaFullError, match=r"post\(1\): .* next to the 1 record still in flight; "
                                                 r"use arena_bytes of at least \(lag \+ 2\)"):
            creator.post(1, send, [n, n], timeout=30)
        # Nothing was published: once 0 is completed, 1 goes in.
        assert [comm.complete(0)[1].tolist() for comm in (creator, other)] == [[n, n]] * 2
        for comm in (creator, other):
            comm.post(1, send, [n, n])
        assert [comm.complete(1)[1].tolist() for comm in (creator, other)] == [[n, n]] * 2
    finally:
        other.close()
        creator.close()


def test_huge_counts_are_a_clear_error():
    # Counts past what send holds were said to be larger than any arena:
    # the user was sent to arena_bytes instead of to the counts.
    with blsshm.Comm.create(1) as comm:
        for counts in ([2 ** 64], [2 ** 63], np.array([2 ** 63 - 1], dtype=np.int64)):
            with pytest.raises(BlsValueError, match=r"send_counts\[0\] = \d+ elements but send holds 4") as info:
                comm.post(0, GOOD, counts)
            assert not isinstance(info.value, ArenaFullError)
        with pytest.raises(BlsValueError, match=r"send_counts\[0\] = -\d+ is negative"):
            comm.post(0, GOOD, [-2 ** 64])  # was "larger than any arena" too
        comm.alltoallv(GOOD, [4])


def test_the_name_is_gone_once_every_rank_attached():
    import os
    first = blsshm.Comm.create(2, rank=0)
    try:
        assert os.path.exists("/dev/shm" + first.name)
        second = blsshm.Comm.attach(first.name, 1)
        assert not os.path.exists("/dev/shm" + first.name)  # before any collective
        second.close()
    finally:
        first.close()


def _blocking_call_with_small_out(comm):
    with pytest.raises(BlsValueError, match=r"out holds 3 elements; iteration 0 delivers 4.*call complete\(0\)"):
        comm.alltoallv(GOOD, [2, 2], out=np.empty(3, np.float32))
    assert (comm.next_post, comm.next_complete) == (1, 0)  # posted: the size was known only then
    recv, counts = comm.complete(0, out=np.empty(4, np.float32))
    return recv.tolist(), counts.tolist(), comm.alltoallv(GOOD, [2, 2])[0].tolist()


def test_blocking_call_with_too_small_out_leaves_the_iteration_to_complete():
    """The one bad input found after posting: the message says how to finish the iteration."""
    rank0, rank1 = [0.0, 1.0, 0.0, 1.0], [2.0, 3.0, 2.0, 3.0]
    assert blsshm.spawn(_blocking_call_with_small_out, 2, timeout=30) == [
        (rank0, [2, 2], rank0), (rank1, [2, 2], rank1)]


STRUCTURED = np.dtype([("id", "<i4"), ("score", "<f4")])


@pytest.mark.parametrize("dtype", [STRUCTURED, np.dtype(("<f4", (2,)))], ids=["structured", "subarray"])
def test_dtypes_that_would_arrive_as_raw_bytes_are_refused_before_posting(dtype):
    with blsshm.Comm.create(1) as comm:
        if dtype.names:  # an array of a subarray dtype is an array of its base: only views can ask for one
            with pytest.raises(BlsTypeError, match=r"would arrive as \|V8"):
                comm.post(0, np.zeros(2, dtype), [2])
        with pytest.raises(BlsTypeError, match=r"would arrive as \|V8"):
            comm.post_views(0, [2], dtype).__enter__()
        assert comm.next_post == 0
        raw = np.arange(4, dtype=np.int32).view(np.uint8)  # the way round: bytes, viewed again on arrival
        recv, _ = comm.alltoallv(raw, [raw.size])
        assert recv.view(STRUCTURED)["id"].tolist() == [0, 2]


@pytest.mark.parametrize("dtype, error, words", [
    (None, BlsTypeError, "dtype=None is refused"),
    (("i4", -1), BlsValueError, "not a valid dtype"),
    ("no such dtype", BlsTypeError, "not a dtype"),
], ids=["None", "negative shape", "a name numpy does not know"])
def test_a_bad_zero_copy_dtype_is_refused_before_anything_is_reserved(dtype, error, words):
    """None is not the default's float32 but numpy's float64: refused, not sent to peers expecting float32."""
    with blsshm.Comm.create(1) as comm:
        with pytest.raises(error, match=words):
            comm.post_views(0, [2], dtype).__enter__()
        with comm.post_views(0, [2]) as views:  # nothing was reserved: t is still free
            views[0][:] = 7
        assert comm.complete(0)[0].tolist() == [7.0, 7.0]


@pytest.mark.parametrize("spin", ["-1", "soon", "inf", "1e300"])
def test_a_bad_spin_setting_is_refused_before_the_rank_is_claimed(spin, monkeypatch):
    """A retry must find the rank free: nothing of the segment is touched before the check."""
    with blsshm.Comm.create(2, 0) as creator:
        monkeypatch.setenv("BLSSHM_SPIN_US", spin)
        with pytest.raises(BlsValueError, match="BLSSHM_SPIN_US"):  # the setting, not an argument
            blsshm.Comm.attach(creator.name, 1)
        for wrong in ("fast", "5", b"7", True):
            with pytest.raises(BlsTypeError, match="spin_us"):
                blsshm.Comm.attach(creator.name, 1, spin_us=wrong)
        with pytest.raises(BlsValueError, match="BLSSHM_SPIN_US"):
            blsshm.Comm.create(2)
        monkeypatch.delenv("BLSSHM_SPIN_US")
        with blsshm.Comm.attach(creator.name, 1) as joined:
            assert joined.rank == 1


@pytest.mark.parametrize("setting", ["0", "-5", "often", "nan", "1e-7"])
def test_a_bad_liveness_setting_is_refused(setting, monkeypatch):
    monkeypatch.setenv("BLSSHM_LIVENESS_MS", setting)
    with pytest.raises(BlsValueError, match="BLSSHM_LIVENESS_MS"):
        blsshm.Comm.create(1)  # and the segment it made is gone again (the fixture checks)


def test_the_liveness_setting_sets_how_often_sleepers_check(monkeypatch):
    monkeypatch.setenv("BLSSHM_LIVENESS_MS", "5")
    with blsshm.Comm.create(1) as comm:
        assert comm.slice_ns == 5_000_000
    monkeypatch.delenv("BLSSHM_LIVENESS_MS")
    with blsshm.Comm.create(1) as comm:
        assert comm.slice_ns == 50_000_000


def test_reading_shared_counters_after_close_raises_instead_of_touching_unmapped_memory():
    comm = blsshm.Comm.create(1)
    comm.close()
    for helper in (comm._counters, comm._attached_ranks, comm._peer_pids):
        with pytest.raises(BlsValueError, match="closed"):
            helper()


def test_a_huge_integer_timeout_blocks_like_none():
    with blsshm.Comm.create(1) as comm:
        recv, _ = comm.alltoallv(GOOD, [4], timeout=10 ** 400)
        assert recv.tolist() == GOOD.tolist()


def test_a_closed_communicator_says_so_even_with_an_iteration_outstanding():
    comm = blsshm.Comm.create(1)
    comm.post(0, GOOD, [4])
    comm.close()
    with pytest.raises(BlsError, match="closed"):
        comm.alltoallv(GOOD, [4])


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix itself
@pytest.mark.parametrize("kind", ["memmap", "matrix"])
@pytest.mark.parametrize("size", [2, 3])
def test_what_arrives_in_a_numpy_subclass_out_is_a_plain_array_whatever_its_size(kind, size, tmp_path):
    # An out of exactly the size came back as the subclass itself (a masked
    # array's stale mask then hid what arrived), a larger one as an ndarray.
    if kind == "memmap":
        out = np.memmap(tmp_path / "out", np.float32, "w+", shape=(size,))
    else:
        out = np.matrix(np.zeros((1, size), np.float32))
    with blsshm.Comm.create(1) as comm:
        recv, _ = comm.alltoallv(GOOD[:2], [2], out=out)
    assert type(recv) is np.ndarray and recv.tolist() == [0.0, 1.0] and np.shares_memory(recv, out)


def test_a_masked_send_is_refused_rather_than_sent_without_its_mask():
    with blsshm.Comm.create(1) as comm:
        with pytest.raises(BlsTypeError, match=r"send is a numpy masked array.*filled"):
            comm.alltoallv(np.ma.array([1.0, 2.0], mask=[0, 1]), [2])
        assert comm.next_post == 0


def test_a_string_dtype_of_varying_width_is_named_as_such():
    with blsshm.Comm.create(1) as comm:
        with pytest.raises(BlsTypeError, match="holds strings of varying width"):
            comm.alltoallv(np.array(["a", "bc"], dtype=np.dtypes.StringDType()), [2])
        assert comm.next_post == 0


def test_a_matrix_out_larger_than_needed_receives_into_its_first_elements():
    out = np.matrix(np.full((2, 3), -1.0, np.float32))
    with blsshm.Comm.create(1) as comm:
        recv, counts = comm.alltoallv(GOOD[:2], [2], out=out)
    assert recv.shape == (2,) and recv.tolist() == [0.0, 1.0] and counts.tolist() == [2]
    assert out.tolist() == [[0.0, 1.0, -1.0], [-1.0, -1.0, -1.0]]


def test_communicator_arguments_are_checked_when_it_is_made():
    with pytest.raises(BlsValueError, match="size must be at least 1, got 0"):
        blsshm.Comm.create(0)
    with pytest.raises(BlsTypeError, match="attach_timeout must be a number of seconds"):
        blsshm.Comm.create(1, attach_timeout="x")  # was accepted, then failed at the first call
    with pytest.raises(BlsValueError, match="timeout must be >= 0"):
        blsshm.Comm.create(1, timeout=-1)
    with blsshm.Comm.create(1, attach_timeout=10 ** 400) as comm:  # forever, not an OverflowError later
        assert comm.alltoallv(GOOD, [4])[0].tolist() == GOOD.tolist()
    with blsshm.Comm.create(2) as comm:
        with pytest.raises(BlsValueError, match=r"rank 1099511627776 is past any communicator's last"):
            blsshm.Comm.attach(comm.name, 2 ** 40)  # was an OverflowError
        with pytest.raises(BlsValueError, match="rank must be at least 0, got -1"):
            blsshm.Comm.attach(comm.name, -1)  # said "in [0, 4096)": the segment's 2 were not read yet


def test_a_post_past_this_ranks_own_lag_bound_is_bad_input_even_with_a_peer_gone():
    # It was checked after the peers: a closed peer made it a PeerLostError.
    with blsshm.Comm.create(2, 0, timeout=10) as a, blsshm.Comm.attach(a.name, 1, timeout=10) as b:
        a.post(0, np.zeros(2), [1, 1])
        b.close()  # before posting 0: iteration 0 can never complete
        with pytest.raises(blsshm.BlsValueError, match=r"post\(1\) needs this rank to have completed "
                                                       r"iteration 0 first \(lag 0\); it has completed 0"):
            a.post(1, np.zeros(2), [1, 1])
        with pytest.raises(blsshm.PeerLostError):
            a.complete(0)
