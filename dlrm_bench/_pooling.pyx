# cython: language_level=3
"""Sum-pooled embedding bags, written straight into the caller's output.

The DLRM lookup kernel: for each bag (one sample's lookups in one table) it
sums the listed rows of the table and writes the sum into one row segment of
``out``.  ``out`` is typically a zero-copy send view of blsshm, so the pooled
rows never pass through an intermediate buffer.

Summation order is fixed: rows are added one after the other, in the order
the bag lists them, in float32, starting from zero.  The result of a bag is
therefore a function of the bag alone, whichever rank or process computes
it; the distributed run and the single-process check agree bit for bit.
"""
from libc.stdint cimport int64_t
from libc.string cimport memset

cdef extern from *:
    """
    #define POOL_PREFETCH(p) __builtin_prefetch((p), 0, 0)
    """
    void POOL_PREFETCH(const void* p) noexcept nogil

# Rows are scattered over tables far larger than the caches, so the loop is
# bound by memory latency; asking for the row PREFETCH_AHEAD lookups ahead
# overlaps those misses.
DEF PREFETCH_AHEAD = 8


def pool_sum(const float[:, ::1] table, const int64_t[::1] indices, const int64_t[::1] offsets,
             Py_ssize_t first_bag, float[:, ::1] out, Py_ssize_t column):
    """Pool bags ``first_bag .. first_bag + out.shape[0] - 1`` into ``out[:, column:column + d]``.

    ``table`` is ``(rows, d)`` float32; bag ``b`` is
    ``indices[offsets[b]:offsets[b + 1]]``; an empty bag pools to zeros.
    Every index is checked against ``rows`` and every offset against
    ``indices``, so a bad batch raises instead of reading stray memory.
    """
    cdef Py_ssize_t rows = table.shape[0], d = table.shape[1]
    cdef Py_ssize_t nbags = out.shape[0]
    if first_bag < 0 or first_bag + nbags + 1 > offsets.shape[0]:
        raise IndexError(f"bags {first_bag}..{first_bag + nbags - 1} are not all in offsets "
                         f"of {offsets.shape[0] - 1} bags")
    if column < 0 or column + d > out.shape[1]:
        raise IndexError(f"columns {column}..{column + d - 1} do not fit an output of width {out.shape[1]}")
    cdef Py_ssize_t b, k, j, bad_pos = -1
    cdef int64_t lo = 0, hi = 0, row = 0, ahead
    cdef bint bad_offsets = False
    cdef const float* src
    cdef float* dst
    with nogil:
        for b in range(nbags):
            lo = offsets[first_bag + b]
            hi = offsets[first_bag + b + 1]
            dst = &out[b, column]
            memset(dst, 0, d * sizeof(float))
            if lo < 0 or hi < lo or hi > indices.shape[0]:
                bad_pos, bad_offsets = first_bag + b, True
                break
            for k in range(lo, hi):
                if k + PREFETCH_AHEAD < indices.shape[0]:
                    ahead = indices[k + PREFETCH_AHEAD]
                    if 0 <= ahead < rows:
                        for j in range(0, d, 16):  # every 64-byte line of the row ...
                            POOL_PREFETCH(&table[ahead, j])
                        POOL_PREFETCH(&table[ahead, d - 1])  # ... and the last, rows being unaligned
                row = indices[k]
                if row < 0 or row >= rows:
                    bad_pos = k
                    break
                src = &table[row, 0]
                for j in range(d):
                    dst[j] += src[j]
            if bad_pos >= 0:
                break
    if bad_pos >= 0:
        if bad_offsets:
            raise IndexError(f"bag {bad_pos} has offsets {lo}..{hi} outside {indices.shape[0]} indices")
        raise IndexError(f"index {row} at position {bad_pos} is outside a table of {rows} rows")
