"""DESIGN §5: a receiver never trusts what a sender wrote in shared memory.

A rank that finds a malformed mailbox or descriptor (a stale stamp, a block
outside the sender's arena, a bad dtype) aborts the communicator with a
protocol error naming the sender and iteration, instead of reading outside
the segment or returning garbage, and every peer then raises too.

Both ranks live in this one process, so the test can overwrite a line after
the sender posted and before the receiver reads it, with no race.  The field
offsets below mirror the structs in ``blsshm/_layout.h``.
"""
import numpy as np
import pytest

from blsshm import Comm, CommAborted, _core

pytestmark = pytest.mark.timeout(60)

LINE = 128
# bls_mbox_t
MB_STAMP, MB_NBYTES, MB_INLINE, MB_ITEMSIZE, MB_DTYPE, MB_DATA = 0, 8, 16, 20, 24, 48
# bls_desc_t
D_STAMP, D_RECORD_OFFSET, D_RECORD_BYTES, D_ITEMSIZE, D_DTYPE, D_BLOCKS = 0, 8, 16, 24, 28, 48
DTYPE_CHARS = 20

SMALL = 2    # float64 elements per block: 16 bytes, inline in the mailbox
LARGE = 64   # 512 bytes: in the sender's record
NO_MAILBOX_LAG = 32768  # 2 x 2 x 32770 mailbox lines > 16 MiB: the segment has none


class Line:
    """Read and overwrite the fields of one shared line of a live segment."""

    def __init__(self, comm, offset):
        self.seg = np.frombuffer(comm._mapping, np.uint8)
        self.offset = offset

    def u64(self, field):
        return int(self.seg[self.offset + field:][:8].view(np.uint64)[0])

    def set_u64(self, field, value):
        self.seg[self.offset + field:][:8].view(np.uint64)[0] = value

    def set_u32(self, field, value):
        self.seg[self.offset + field:][:4].view(np.uint32)[0] = value

    def set_dtype(self, field, chars):
        raw = chars.ljust(DTYPE_CHARS, b"\0")[:DTYPE_CHARS]
        self.seg[self.offset + field:][:DTYPE_CHARS] = np.frombuffer(raw, np.uint8)


def mailbox(comm, sender, receiver, t):
    lay = _core.layout(comm.size, comm.lag, comm.arena_bytes)
    assert lay["mbox_offset"] != 0
    slot = t % lay["slots"]
    return Line(comm, lay["mbox_offset"] + ((sender * comm.size + receiver) * lay["slots"] + slot) * LINE)


def descriptor(comm, sender, t):
    lay = _core.layout(comm.size, comm.lag, comm.arena_bytes)
    assert lay["mbox_offset"] == 0
    slot = t % lay["slots"]
    return Line(comm, lay["descs_offset"] + (sender * lay["slots"] + slot) * lay["desc_stride"])


# (label, block elements, how to corrupt rank 1's line to rank 0, words of the error)
MAILBOX_CASES = [
    ("stale stamp", SMALL, lambda mb, c: mb.set_u64(MB_STAMP, 5),
     ["mailbox for iteration 0 holds iteration 4"]),
    ("inline block longer than a mailbox", SMALL, lambda mb, c: mb.set_u64(MB_NBYTES, 88),
     ["block for iteration 0 overflows its mailbox"]),
    ("block offset past the arena", LARGE, lambda mb, c: mb.set_u64(MB_DATA, 1 << 40),
     ["block for iteration 0 lies outside its arena"]),
    ("block running off the arena's end", LARGE, lambda mb, c: mb.set_u64(MB_DATA, c.arena_bytes - 64),
     ["block for iteration 0 lies outside its arena"]),
    ("byte count wrapping the arena", LARGE, lambda mb, c: mb.set_u64(MB_NBYTES, (1 << 64) - 8),
     ["block for iteration 0 lies outside its arena"]),
    ("part of an element", LARGE, lambda mb, c: mb.set_u64(MB_NBYTES, 8 * LARGE - 3),
     ["block for iteration 0 is not whole elements"]),
    ("another item size", SMALL, lambda mb, c: mb.set_u32(MB_ITEMSIZE, 4),
     ["dtype mismatch at iteration 0", "rank 1 sent <f8 in 4-byte items", "rank 0 sent <f8 in 8-byte items"]),
    ("another dtype", LARGE, lambda mb, c: mb.set_dtype(MB_DTYPE, b"<i8"),
     ["dtype mismatch at iteration 0", "rank 1 sent <i8", "rank 0 sent <f8"]),
]


def _pair(lag, arena_bytes=1 << 20):
    a = Comm.create(2, 0, lag=lag, arena_bytes=arena_bytes, timeout=10)
    b = Comm.attach(a.name, 1, timeout=10)
    return a, b


def _post_both(a, b, t, elements):
    send = np.arange(2 * elements, dtype=np.float64)
    a.post(t, send, [elements, elements])
    b.post(t, send, [elements, elements])


def _assert_everyone_raises(a, b, words):
    """Rank 0's receive aborts with ``words``; rank 1 is told, not left waiting."""
    with pytest.raises(CommAborted) as caught:
        a.complete(0)
    for w in words:
        assert w in str(caught.value)
    assert "rank 1" in str(caught.value)
    with pytest.raises(CommAborted) as told:
        b.complete(0)
        b.post(1, np.zeros(2), [1, 1])
        b.complete(1)
    assert "aborted by rank 0" in str(told.value)
    assert words[0][:40] in told.value.reason  # the reason travels (truncated) through the segment
    with pytest.raises(CommAborted):  # the aborting rank stays aborted
        a.post(1, np.zeros(2), [1, 1])


@pytest.mark.parametrize("label, elements, corrupt, words", MAILBOX_CASES,
                         ids=[c[0] for c in MAILBOX_CASES])
@pytest.mark.parametrize("lag", [0, 2])
def test_a_malformed_mailbox_aborts_everyone(label, elements, corrupt, words, lag):
    a, b = _pair(lag)
    try:
        _post_both(a, b, 0, elements)
        corrupt(mailbox(a, 1, 0, 0), a)
        _assert_everyone_raises(a, b, words)
    finally:
        a.close()
        b.close()


ZERO_COPY_CASES = [
    ("unterminated dtype", lambda mb: mb.set_dtype(MB_DTYPE, b"x" * DTYPE_CHARS),
     "dtype for iteration 0 is not terminated"),
    ("unknown dtype", lambda mb: mb.set_dtype(MB_DTYPE, b"<q9z"), "rank 1 sent an unknown dtype at iteration 0"),
    ("object dtype", lambda mb: mb.set_dtype(MB_DTYPE, b"|O"), "rank 1 sent an object dtype at iteration 0"),
    ("item size not the dtype's", lambda mb: mb.set_u32(MB_ITEMSIZE, 4), "rank 1 sent an invalid dtype"),
]


@pytest.mark.parametrize("label, corrupt, words", ZERO_COPY_CASES, ids=[c[0] for c in ZERO_COPY_CASES])
def test_zero_copy_receive_checks_the_dtype_it_is_sent(label, corrupt, words):
    """Zero-copy receivers take the dtype from the sender: it must name a plain numpy dtype."""
    a, b = _pair(1)
    try:
        _post_both(a, b, 0, LARGE)
        corrupt(mailbox(a, 1, 0, 0))
        with pytest.raises(CommAborted, match=words):
            with a.complete_views(0):
                pass
        # Once aborted, an iteration whose blocks all arrived may still be
        # completed: a second try must check the dtype again (an object dtype
        # cached by the first try once gave views that crashed the reader).
        with pytest.raises(CommAborted, match=words):
            with a.complete_views(0):
                pass
        with pytest.raises(CommAborted, match="aborted by rank 0"):
            with b.complete_views(0):
                pass
            b.post(1, np.zeros(2), [1, 1])
            b.complete(1)
    finally:
        a.close()
        b.close()


DESCRIPTOR_CASES = [
    ("stale stamp", lambda d, c: d.set_u64(D_STAMP, 3), "descriptor for iteration 0 holds iteration 2"),
    ("record past the arena", lambda d, c: d.set_u64(D_RECORD_OFFSET, c.arena_bytes),
     "record for iteration 0 lies outside its arena"),
    ("record running off the arena's end", lambda d, c: d.set_u64(D_RECORD_OFFSET, c.arena_bytes - 64),
     "record for iteration 0 lies outside its arena"),
    ("block past its record", lambda d, c: d.set_u64(D_BLOCKS, 1 << 20),
     "record for iteration 0 lies outside its arena"),
    ("block longer than its record", lambda d, c: d.set_u64(D_BLOCKS + 8, 1 << 20),
     "record for iteration 0 lies outside its arena"),
    ("another dtype", lambda d, c: d.set_dtype(D_DTYPE, b"<i8"), "dtype mismatch at iteration 0"),
]


@pytest.mark.parametrize("label, corrupt, words", DESCRIPTOR_CASES, ids=[c[0] for c in DESCRIPTOR_CASES])
def test_a_malformed_descriptor_aborts_everyone(label, corrupt, words):
    """Segments too big for mailboxes find blocks through the sender's descriptor: same checks."""
    a, b = _pair(NO_MAILBOX_LAG, arena_bytes=1 << 16)
    try:
        _post_both(a, b, 0, LARGE)
        corrupt(descriptor(a, 1, 0), a)
        _assert_everyone_raises(a, b, [words])
    finally:
        a.close()
        b.close()


def test_the_lines_these_tests_corrupt_are_the_ones_the_protocol_reads():
    """Guard against the offsets above drifting from ``_layout.h``: read a real post back."""
    a, b = _pair(1)
    try:
        _post_both(a, b, 0, LARGE)
        mb = mailbox(a, 1, 0, 0)
        assert mb.u64(MB_STAMP) == 1 and mb.u64(MB_NBYTES) == 8 * LARGE
        assert bytes(mb.seg[mb.offset + MB_DTYPE:][:4]) == b"<f8\0"
        received, counts = a.complete(0)
        assert list(counts) == [LARGE, LARGE]
        np.testing.assert_array_equal(received[LARGE:], np.arange(LARGE, dtype=np.float64))
    finally:
        a.close()
        b.close()
    a, b = _pair(NO_MAILBOX_LAG, arena_bytes=1 << 16)
    try:
        _post_both(a, b, 0, LARGE)
        d = descriptor(a, 1, 0)
        assert d.u64(D_STAMP) == 1 and d.u64(D_RECORD_BYTES) >= 2 * 8 * LARGE
        assert d.u64(D_BLOCKS + 8) == 8 * LARGE  # rank 1's block for rank 0
    finally:
        a.close()
        b.close()


def test_a_protocol_error_after_our_own_abort_reports_the_first_reason():
    # The rank raised the protocol error as its own reason while every peer
    # (and the segment) said "first".
    with Comm.create(2, 0, arena_bytes=1 << 16, timeout=5) as a, Comm.attach(a.name, 1, timeout=5) as b:
        a.post(0, np.zeros(2, np.float32), [1, 1])
        b.post(0, np.zeros(2, np.float64), [1, 1])  # a dtype mismatch for a to find
        a.abort("first")
        for comm in (a, b):
            with pytest.raises(CommAborted) as info:
                comm.complete(0)
            assert info.value.reason == "first"
