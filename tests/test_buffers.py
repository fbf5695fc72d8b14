"""blsshm.empty: send buffers on transparent huge pages, read directly by other ranks."""
import gc

import numpy as np
import pytest

import blsshm
from blsshm.buffers import HUGE_PAGE_BYTES

MIB = 1 << 20
needs_thp = pytest.mark.skipif(not HUGE_PAGE_BYTES, reason="this kernel has no transparent huge pages")


def _vma_of(address):
    """(start, end, VmFlags) of the mapping of this process holding ``address``, or None."""
    with open("/proc/self/smaps") as f:
        start = end = None
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
            elif head == "VmFlags:" and start <= address < end:
                return start, end, line.split()[1:]
    return None


@pytest.mark.parametrize("shape, dtype", [((3, MIB // 4), np.float32), (2 * MIB + 5, np.uint8),
                                          ((MIB // 8,), "f8"), ((4, 0, MIB), np.int32)])
def test_an_array_of_the_shape_and_dtype_asked_zero_filled_and_writable(shape, dtype):
    a = blsshm.empty(shape, dtype)
    assert a.shape == (shape if isinstance(shape, tuple) else (shape,))
    assert a.dtype == np.dtype(dtype) and a.flags.c_contiguous and a.flags.writeable
    assert not a.any()
    a.fill(7)
    assert (a == 7).all()


@needs_thp
def test_a_large_array_starts_on_a_huge_page_advised_for_huge_pages_and_is_unmapped_with_its_last_view():
    a = blsshm.empty(3 * MIB // 2, np.uint8)
    address = a.ctypes.data
    assert address % HUGE_PAGE_BYTES == 0
    start, end, flags = _vma_of(address)
    assert "hg" in flags  # MADV_HUGEPAGE
    assert end - address >= 3 * MIB // 2 and end - address >= HUGE_PAGE_BYTES  # the whole last huge page
    view = a[MIB:]
    del a
    gc.collect()
    assert _vma_of(address) is not None  # the view keeps the mapping
    del view
    gc.collect()
    vma = _vma_of(address)
    assert vma is None or vma[0] != start  # unmapped (or the address reused by a mapping of its own)


def test_a_small_array_is_an_ordinary_numpy_array():
    a = blsshm.empty(1000, np.float64)
    assert type(a) is np.ndarray and a.base is None and not a.any()


@pytest.mark.parametrize("shape, dtype, error, words", [
    ((2, -1), np.uint8, blsshm.BlsValueError, "negative dimension"),
    (2.5, np.uint8, blsshm.BlsTypeError, "shape must be an integer"),
    ((2, "x"), np.uint8, blsshm.BlsTypeError, "shape must be an integer"),
    ((MIB,), object, blsshm.BlsTypeError, "Python objects"),
])
def test_bad_shapes_and_object_dtypes_are_refused_by_name(shape, dtype, error, words):
    with pytest.raises(error, match=words):
        blsshm.empty(shape, dtype)


def test_more_than_can_be_mapped_is_a_memory_error_as_in_numpy():
    with pytest.raises(MemoryError, match=r"cannot map \d+ bytes for shape \(1099511627776, 1048576\)"):
        blsshm.empty((1 << 40, MIB), np.uint8)


def _exchange_from_huge_pages(comm, block, iters):
    P = comm.size
    send = blsshm.empty(P * block, np.uint8)
    for q in range(P):
        send[q * block:(q + 1) * block] = 10 * comm.rank + q
    wrong = []
    for t in range(iters):
        send += 1  # new bytes each iteration: a stale read would show
        recv, counts = comm.alltoallv(send, [block] * P)
        expected = [(10 * s + comm.rank + t + 1) % 256 for s in range(P)]
        if not all((recv[s * block:(s + 1) * block] == expected[s]).all() for s in range(P)):
            wrong.append(t)
    return wrong, comm.stats["bytes_read_direct"]


@pytest.mark.timeout(60)
def test_blocks_sent_from_huge_pages_are_read_directly_and_arrive_exact():
    out = blsshm.spawn(_exchange_from_huge_pages, 2, args=(MIB, 20), arena_bytes=8 * MIB)
    for rank, (wrong, _) in enumerate(out):
        assert wrong == [], f"rank {rank} got wrong bytes at iterations {wrong}"
    # Each offer is read directly unless its sender finishes its own
    # receiving first: not 20 times in a row for both ranks.
    assert sum(direct for _, direct in out) > 0
