# cython: language_level=3
"""A hardware floor for the benchmarks: how long a cache line takes to cross cores.

Two threads, each pinned to its own CPU by the caller, bounce a counter
between two cache lines (``pingpong``).  On a virtual machine the figure
also says where the host put the virtual CPUs: the same alltoallv can be 4x
slower when they land on cores that do not share a cache, so benchmark
tools print it next to their results.
"""
from libc.stdint cimport int64_t, uint64_t

cdef extern from "_sync.h" nogil:
    uint64_t bls_load_acquire(const uint64_t *p)
    void bls_store_release(uint64_t *p, uint64_t v)
    void bls_cpu_relax()
    int64_t bls_now_ns()

cdef enum:
    LINE_WORDS = 16  # 128 bytes: the two counters never share a prefetch pair


def pingpong(unsigned char[::1] lines not None, int role, uint64_t rounds, double timeout_s=5.0):
    """One side of a ping-pong over ``lines`` (256 zeroed bytes shared by both sides).

    ``role`` 0 serves first and returns the nanoseconds for ``rounds`` round
    trips (the one-way latency is half a round trip); ``role`` 1 answers and
    returns 0.  The GIL is released, so the two sides may be threads of one
    process.  Returns -1 if all ``rounds`` did not end within ``timeout_s`` in
    all (the other side is gone, or the two were preempted that long).
    """
    if lines.shape[0] < 2 * LINE_WORDS * 8:
        raise ValueError("lines must hold at least 256 bytes")
    if role not in (0, 1):
        raise ValueError(f"role must be 0 or 1, got {role}")
    cdef uint64_t* words = <uint64_t*>&lines[0]
    cdef uint64_t* ping = words
    cdef uint64_t* pong = words + LINE_WORDS
    cdef uint64_t i
    cdef uint64_t spins = 0
    cdef int64_t start, deadline
    cdef int64_t elapsed = 0
    with nogil:
        start = bls_now_ns()
        deadline = start + <int64_t>(timeout_s * 1e9)
        for i in range(1, rounds + 1):
            if role == 0:
                bls_store_release(ping, i)
            # Acquire/release pair each hand-over, as the protocol's counters do.
            while bls_load_acquire(pong if role == 0 else ping) < i:
                bls_cpu_relax()
                spins += 1
                if (spins & 4095) == 0 and bls_now_ns() > deadline:
                    elapsed = -1
                    break
            if elapsed < 0:
                break
            if role == 1:
                bls_store_release(pong, i)
        if elapsed == 0 and role == 0:
            elapsed = bls_now_ns() - start
    return elapsed
