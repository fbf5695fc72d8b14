# cython: language_level=3
"""The bounded-lag alltoallv protocol over one shared-memory mapping.

This module is the whole protocol (DESIGN §2-§3); the layout is in
``_layout.h`` and the atomics, futex and clock in ``_sync.h``.

Rank ``s`` posts iteration ``t`` into slot ``t % S`` (S = L + 2 slots: see
``_slot_count``).  If every block
fits a mailbox (80 bytes), it writes each block into its one-line mailbox
for (``s``, receiver, slot); otherwise it writes a record (one block per
destination) into its own arena, and each mailbox says where in the record
its block is.  Each mailbox's stamp is then set to ``t + 1`` (release), and
``published[s] = t + 1``
(release).  Rank ``r`` completes ``t`` once its mailbox from every sender
reads ``t + 1`` (acquire loads: a small block arrives with its stamp, in one
cache-line transfer; ``published`` serves sleepers, liveness checks and
tools), reads its blocks, then stores ``completed[r] = t + 1`` with release.
A sender may reuse a slot or a record once every ``completed`` has passed its
iteration.  ``post(t)`` first waits until every ``completed >= t - L``: this
is the lag bound I2 (the post inside a blocking ``alltoallv`` waits only for
its slot).  Segments too large for mailboxes (P x P x S lines
over 16 MiB) have none: a sender then describes each record in a descriptor
per (sender, slot), whose stamp it sets to ``t + 1`` (release), and receivers
poll those stamps.
"""

cimport cython
from libc.stdint cimport uint32_t, uint64_t, int64_t, int32_t, uintptr_t
from libc.string cimport memcpy, memset, strncpy, strncmp, memchr
from libc.stdlib cimport calloc, free
from libc.errno cimport errno, EINTR
from posix.unistd cimport getpid, close, usleep
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_SIMPLE
from cpython.long cimport PyLong_AsLongLong
from cpython.ref cimport Py_INCREF, Py_XDECREF, Py_REFCNT, PyObject
from cpython.tuple cimport PyTuple_New, PyTuple_GET_ITEM, PyTuple_SET_ITEM
from cpython.object cimport PyTypeObject
cimport numpy as cnp

cdef extern from "Python.h":
    int PyObject_GC_IsTracked(object)
    void PyObject_GC_Track(object)
    # Declared without an exception clause: _wait calls it in a nogil,
    # noexcept function and leaves the exception set for _await to raise.
    int check_signals "PyErr_CheckSignals"() noexcept

import operator
from collections.abc import Mapping

import numpy as np

from blsshm._arrays import as_array, mark_written, tensor_as_array, to_torch
from blsshm.errors import (
    ArenaFullError, BlsError, BlsTimeoutError, BlsTypeError, BlsValueError,
    CommAborted, PeerLostError,
)

cnp.import_array()

cdef extern from "numpy/arrayobject.h":
    # These steal a reference to descr / base (hence the Py_INCREF at the call sites).
    object _PyArray_Empty "PyArray_Empty"(int nd, cnp.npy_intp* dims, cnp.dtype descr, int fortran)
    object _PyArray_NewFromDescr "PyArray_NewFromDescr"(
        PyTypeObject* subtype, cnp.dtype descr, int nd, cnp.npy_intp* dims, cnp.npy_intp* strides,
        void* data, int flags, object obj)
    int _PyArray_SetBaseObject "PyArray_SetBaseObject"(cnp.ndarray arr, object base) except -1

cdef extern from "_sync.h" nogil:
    uint64_t bls_load_acquire(const uint64_t *p)
    uint32_t bls_load_acquire32(const uint32_t *p)
    uint32_t bls_load_relaxed32(const uint32_t *p)
    void bls_store_relaxed32(uint32_t *p, uint32_t v)
    int bls_current_cpu()
    bint bls_mul_overflow(uint64_t a, uint64_t b, uint64_t* product)
    void bls_store_release(uint64_t *p, uint64_t v)
    void bls_store_release32(uint32_t *p, uint32_t v)
    int bls_cas32(uint32_t *p, uint32_t expected, uint32_t desired)
    uint32_t bls_exchange32(uint32_t *p, uint32_t v)
    void bls_add32(uint32_t *p, int32_t v)
    void bls_fence()
    void bls_compiler_barrier()
    int bls_membarrier_available()
    int bls_membarrier_register()
    int bls_membarrier_heavy()
    void bls_cpu_relax()
    int64_t bls_now_ns()
    int64_t bls_coarse_now_ns()
    int bls_futex_wait3(uint64_t *counter, uint32_t seen, uint32_t *abort_word,
                        uint32_t *closes, uint32_t closes_seen, int64_t timeout_ns)
    int bls_futex_waitv_works()
    int bls_waitv_support
    void bls_futex_wake_all(uint64_t *counter)
    void bls_futex_wake_all32(uint32_t *word)
    int bls_pidfd_exited(int pidfd)
    void bls_yield()
    int bls_lock_hold(int fd, int byte)
    int bls_lock_released(int fd, int byte)
    int bls_pid_exited(int pid)

cdef extern from "_copy.h" nogil:
    enum:
        BLS_HAVE_STREAM
    void bls_stream_copy(char *dst, const char *src, size_t n)
    void bls_stream_begin()
    void bls_stream_end()
    void bls_copy_init()
    void bls_prefetch_for_write(char *dst, size_t n)

cdef extern from "_spread.h" nogil:
    int bls_allowed_cpus(int *cpus, int max)
    int bls_move_to_cpu(int cpu)

cdef extern from "_layout.h" nogil:
    enum:
        BLS_LINE
        BLS_MAGIC
        BLS_VERSION
        BLS_BLOCK_ALIGN
        BLS_DTYPE_CHARS
        BLS_REASON_CHARS
        BLS_STATE_EMPTY
        BLS_STATE_ATTACHED
        BLS_STATE_CLOSED
        BLS_ABORT_USER
        BLS_ABORT_PEER_LOST
        BLS_ABORT_PROTOCOL
        BLS_MBOX_DATA
        BLS_DIRECT_NONE
        BLS_DIRECT_OFFERED
        BLS_DIRECT_CLAIMED
        BLS_DIRECT_DONE
        BLS_DIRECT_REFUSED
        BLS_DIRECT_WANTED
        BLS_DIRECT_WITHDRAWN
        BLS_DIRECT_FILLED
        BLS_DIRECT_ABANDONED
    ctypedef struct bls_header_t:
        uint64_t magic
        uint32_t version
        uint32_t nranks
        uint32_t lag
        uint32_t desc_stride
        uint64_t arena_bytes
        uint64_t segment_bytes
        uint64_t descs_offset
        uint64_t arenas_offset
        uint64_t mbox_offset
    ctypedef struct bls_abort_t:
        uint32_t word
        uint32_t closes
    ctypedef struct bls_rank_t:
        uint64_t published
        uint32_t published_sleepers
        uint32_t fence_free
        uint64_t completed
        uint32_t completed_sleepers
        uint32_t state
        int32_t pid
        uint32_t abort_kind
        int32_t abort_lost_rank
        uint32_t cpu_hint
        uint64_t pid_ns
        uint32_t holds_lock
        char abort_reason[1]
    ctypedef struct bls_desc_t:
        uint64_t stamp
        uint64_t record_offset
        uint64_t record_bytes
        uint32_t itemsize
        char dtype[1]
        uint64_t blocks[1]
    ctypedef struct bls_mbox_t:
        uint64_t stamp
        uint64_t nbytes
        uint32_t inline_data
        uint32_t itemsize
        char dtype[1]
        char data[1]
        uint64_t block_offset
        uint64_t direct_addr
        uint32_t direct_state

cdef extern from "_direct.h" nogil:
    int bls_read_peer(int pid, char* dst, uint64_t remote, uint64_t n)

# Which counter a wait is about.
cdef enum:
    PUBLISHED = 0
    COMPLETED = 1

# Outcomes of a wait (raised as exceptions once the GIL is held again).
cdef enum:
    OK = 0
    ERR_ABORTED = 1
    ERR_TIMEOUT = 2
    ERR_LOST = 3
    STILL_WAITING = 4  # a wait's first phase, run holding the GIL, ran out (see _await)
    ERR_SIGNAL = 5     # a signal handler raised (Ctrl-C): its exception is set
    ERR_CLOSED = 6     # a signal handler closed the communicator

#: "use the communicator's default timeout" (``comm.timeout``)
DEFAULT_TIMEOUT = object()
MAX_LAG = 1 << 16
# Copies at least this big release the GIL; smaller ones are cheaper than the hand-off.
cdef uint64_t NOGIL_COPY_BYTES = 256 * 1024
MAX_RANKS = 1 << 12
# Mailboxes grow as P x P x (L + 2) lines: beyond this, a segment has none
# and small blocks travel through the records like large ones.
MAX_MBOX_BYTES = 16 << 20
# Defaults of the waiting policy (Comm sets spin_ns from blsshm.comm.SPIN_US).
cdef int64_t DEFAULT_SPIN_NS = 1000000
cdef int64_t DEFAULT_PAUSE_NS = 2000
cdef int64_t NO_DEADLINE_YET = -2     # see Core._await
cdef int SPIN_BATCH = 64              # checks between clock reads while pausing (~2 us)
cdef int64_t DEFAULT_SLICE_NS = 50000000  # liveness is checked at least this often (Comm: LIVENESS_MS)
# A sleep on a fence-free rank's counter whose membarrier failed lasts at most
# this long: a wake missed for want of the barrier then costs no more.
cdef int64_t UNFENCED_SLEEP_NS = 1000000
# Whether ranks attached in this process may announce without a fence (see
# _announce); tests turn it off to run fenced and fence-free ranks together.
cdef bint fence_free_allowed = True
# A wait keeps the GIL this long before it lets other threads run (see _await).
cdef int64_t HOLD_GIL_NS = 20000
# How often a waiting rank checks whether our ranks are unevenly spread over
# the CPUs, and how long it leaves the kernel alone after moving (see _spread_out).
cdef int64_t SPREAD_CHECK_NS = 1000000
cdef int64_t SPREAD_SETTLE_NS = 5000000
cdef enum:
    SPREAD_MAX_CPUS = 256   # CPUs considered (the first of the allowed ones)
# How a post copies its blocks for other ranks into its record (see _copy.h
# and Core._copy_strategy): ordinary stores, or streaming stores that skip the
# read-for-ownership of lines another core has cached.
cdef enum:
    COPY_CACHED = 0
    COPY_STREAM = 1
    COPY_AUTO = 2
COPY_POLICIES = {"cached": COPY_CACHED, "stream": COPY_STREAM, "auto": COPY_AUTO}
# Posts with fewer bytes for other ranks copy cached, untimed, and ask for
# their record's lines ahead of the copy (bls_prefetch_for_write in _copy.h).
cdef uint64_t STREAM_MIN_BYTES = 16 * 1024
# Records with up to this many bytes for other ranks have those lines asked
# for when the last complete ends (_claim_next_lines).  2 ranks, blocking
# alltoallv, median of the per-iteration maximum, builds alternating (6
# pairs of runs): against claiming whole records of up to 8 KiB, own block
# included, 1 KiB per pair -5 %, 2 KiB -17 %, 4 KiB -20 %, 6 KiB -8 %; this
# limit against 8 KiB: 12 KiB 0 %, 16 KiB -12 %, 24 KiB -5 %; a limit of
# 128 KiB took 6 % longer at 64 KiB per pair (48 KiB: within the noise).
# 4 ranks on 2 cores (4 pairs): 1-16 KiB -1 to -5 %.
cdef uint64_t CLAIM_MAX_BYTES = 32 * 1024
# Records go round the first RECYCLE_BYTES of the arena, or RECYCLE_RECORDS
# records of the size being placed if that is more (when Core._fit may wrap
# early: a rank that completed all it posted), not round the whole arena
# (32 MiB by default): walking all of it met every record's lines and pages
# cold, in the writer's caches and TLB and in the receivers'.  Nor round as
# few lines as possible: rewriting the lines a receiver read two iterations
# before was as slow.  2 ranks, blocking alltoallv, median of the
# per-iteration maximum, against walking 32 MiB: 1 KiB per pair -25 %, 4 KiB
# -15 to -20 %, 16 KiB -5 %, 64 KiB and 1 MiB no change; wrapping as soon as
# the oldest record left room: 1 KiB -25 %, 4 KiB -8 %, 16 KiB +17 %.
RECYCLE_BYTES = 256 * 1024
cdef uint64_t recycle_bytes = RECYCLE_BYTES
cdef uint64_t RECYCLE_RECORDS = 8
# Blocks up to this size for a receiver on our CPU are stored cached under
# "stream" (see _shares_our_cpu): measured at 4 and 16 KiB.  Larger ones are
# not assumed to stay in the caches (at 1 MiB per pair a core's blocks
# outgrow its L2), so they stream as before.
cdef uint64_t SHARED_CACHE_MAX_BYTES = 16 * 1024
bls_copy_init()
# Of the posts that choose, one in this many tries the strategy not in use,
# so a change of the host's placement is noticed within that many posts.
cdef uint32_t COPY_EXPLORE_EVERY = 64
# The last COPY_SAMPLES costs of each strategy are kept; the least of them is
# its estimate (noise such as preemption only ever adds time).
cdef enum:
    COPY_SAMPLES = 4
# Streaming is chosen only when it copies in at most this fraction of the
# cached time: its lines then reach receivers from memory rather than from a
# shared cache, a cost the sender's clock does not see.
cdef double STREAM_MARGIN = 0.75
# A blocking alltoallv offers blocks of at least this many bytes for a direct
# read (see BLS_DIRECT_* in _layout.h): one copy through the kernel instead
# of two through the record.  Below it the system call costs more than the
# copy it saves (tools/single_copy.py: 0.38 of memcpy's speed at 64 KiB,
# 0.80 at 1 MiB).  0: never.  Comm.direct_min_bytes sets it per communicator.
DIRECT_MIN_BYTES = 32 * 1024
# A wait for the other side of a direct read (a copy under way) spins for
# pause_ns, yields until spin_ns, then naps this long at a time; it checks
# the peer's liveness, the deadline and signals every HANDOFF_CHECK_NS.
cdef int HANDOFF_NAP_US = 50
cdef int64_t HANDOFF_CHECK_NS = 1000000
# A wait that must not fail lightly (a sender's wait for a read under way,
# or a receiver's once it has read a block it cannot read again: failing
# aborts the communicator) runs at least this long, whatever the call's
# timeout; so does a hand-over wait after another rank aborted.
cdef int64_t HANDOFF_GRACE_NS = 1000000000
# A sender whose yields to a receiver sharing its CPU (_give_way_to_readers)
# went unanswered this many times in a row stops yielding for the next
# GIVE_WAY_SKIPS withdrawals: such a receiver may be busy elsewhere (split
# post/complete, zero copy), or the CPU may belong to another process.
cdef int GIVE_WAY_MISSES = 3
cdef int GIVE_WAY_SKIPS = 64
# recv_direct[s]: how this rank receives source s's block in the complete in progress.
cdef enum:
    FROM_RECORD = 0    # from the record or mailbox (or our own send buffer)
    FROM_FILL = 1      # offered, but the sender copies it to the record: wait for FILLED
    READ_DIRECT = 2    # offered, and read straight from the sender's memory
# Tests make direct reads from some sources fail, as ptrace rules would (EPERM):
# bit s for source rank s < 64.
cdef uint64_t direct_reads_fail = 0

def _fail_direct_reads(uint64_t sources):
    """Make this process's direct reads from the ranks in bitmask ``sources`` fail (tests)."""
    global direct_reads_fail
    direct_reads_fail = sources

# Tests hold a read under way: a claim of an offer from source s < 64 with
# bit s set naps, before reading, while the offer stays CLAIMED, for about
# direct_claims_stall_ms at most (the sender waits, or gives up and takes it back).
cdef uint64_t direct_claims_stall = 0
cdef uint32_t direct_claims_stall_ms = 0  # atomic: another thread may end a nap under way
cdef uint32_t direct_claims_stalled = 0

def _stall_direct_claims(uint64_t sources, double seconds):
    """Make this process hold its claims of offers from the ranks in ``sources`` up to ``seconds`` (tests).

    Another thread may call it during a nap: ``seconds = 0`` ends the nap.
    """
    global direct_claims_stall
    direct_claims_stall = sources
    # Relaxed is enough: it only bounds a nap; no other data rides on it.
    bls_store_relaxed32(&direct_claims_stall_ms, <uint32_t>(seconds * 1e3))

def _direct_claims_stalled():
    """How many claims have begun such a nap (tests; another thread may ask during one)."""
    # Acquire, paired with the release in _stall_claim: a nap counted has
    # begun after its claim was published.
    return bls_load_acquire32(&direct_claims_stalled)


cdef inline bint _overlap(cnp.ndarray a, cnp.ndarray b):
    """Whether the bytes of two C-contiguous arrays overlap."""
    cdef char* a0 = <char*>cnp.PyArray_DATA(a)
    cdef char* b0 = <char*>cnp.PyArray_DATA(b)
    return a0 < b0 + cnp.PyArray_NBYTES(b) and b0 < a0 + cnp.PyArray_NBYTES(a)


cdef inline void _put_dtype(char* field, bytes dstr):
    """Write a dtype string (validated shorter than the field) NUL-padded into a shared field."""
    memset(field, 0, BLS_DTYPE_CHARS)
    memcpy(field, <char*>dstr, len(dstr))


cdef inline uint64_t _round_up(uint64_t n, uint64_t a) noexcept nogil:
    return (n + a - 1) // a * a


cdef inline uint64_t _slot_count(uint64_t lag) noexcept nogil:
    """Descriptor and mailbox slots per sender: ``L + 2``.

    A sender reuses slot ``t mod slots`` once every rank completed the
    iteration it held.  A split post needs only ``L + 1`` (I2 keeps at most
    that many in flight); the one more lets a blocking alltoallv publish
    ``t`` without reading anyone's ``completed``: the slot last held
    ``t - L - 2``, and its own ``complete(t - 1)`` saw every rank post
    ``t - 1``, which each did only after completing ``t - L - 2`` (see
    ``Core._reserve``).  With ``L + 1`` slots (as at lag 1 before), that
    post read every rank's ``completed`` line, one more trip between cores
    per call: a blocking loop at lag 1, 2 ranks, took 0.52-0.57 us at 64 B
    per pair and 1.37 us at 4 KiB, against 0.31-0.33 and 1.00-1.09 with
    ``L + 2``.
    """
    return lag + 2


def layout(nranks, lag, arena_bytes_arg):
    """Offsets and sizes of a segment for ``nranks`` ranks at lag ``lag``.

    Returns a dict with ``slots`` (per sender), ``desc_stride``,
    ``descs_offset``, ``mbox_offset`` (0: no mailboxes), ``arenas_offset``,
    ``arena_bytes`` (rounded up to a page) and ``segment_bytes``.
    """
    if not 1 <= nranks <= MAX_RANKS:
        raise BlsValueError(f"size must be between 1 and {MAX_RANKS}, got {nranks}")
    if not 0 <= lag <= MAX_LAG:
        raise BlsValueError(f"lag must be between 0 and {MAX_LAG}, got {lag}")
    if not 4096 <= arena_bytes_arg <= (1 << 46):
        raise BlsValueError(f"arena_bytes must be between 4096 and 2**46, got {arena_bytes_arg}")
    cdef uint64_t arena_bytes = arena_bytes_arg
    cdef uint64_t desc_stride = _round_up(48 + 16 * <uint64_t>nranks, BLS_LINE)
    cdef uint64_t descs_offset = 2 * BLS_LINE + <uint64_t>nranks * sizeof(bls_rank_t)
    cdef uint64_t slots = _slot_count(lag)
    cdef uint64_t descs_end = descs_offset + <uint64_t>nranks * slots * desc_stride
    cdef uint64_t mbox_bytes = <uint64_t>nranks * nranks * slots * BLS_LINE
    cdef uint64_t mbox_offset = 0
    if mbox_bytes <= MAX_MBOX_BYTES:
        mbox_offset = _round_up(descs_end, BLS_LINE)
        descs_end = mbox_offset + mbox_bytes
    cdef uint64_t arenas_offset = _round_up(descs_end, 4096)
    arena_bytes = _round_up(arena_bytes, 4096)
    return dict(slots=slots, desc_stride=desc_stride, descs_offset=descs_offset, mbox_offset=mbox_offset,
                arenas_offset=arenas_offset, arena_bytes=arena_bytes,
                segment_bytes=arenas_offset + <uint64_t>nranks * arena_bytes)


def initialize(segment, int nranks, int lag, uint64_t arena_bytes):
    """Write the header of a fresh, zero-filled segment (the creator does this once)."""
    lay = layout(nranks, lag, arena_bytes)
    cdef Py_buffer buf
    PyObject_GetBuffer(segment, &buf, PyBUF_WRITABLE)
    cdef bls_header_t* hdr = <bls_header_t*>buf.buf
    try:
        if <uint64_t>buf.len < lay["segment_bytes"]:
            raise BlsValueError("segment is smaller than its layout")
        hdr.version = BLS_VERSION
        hdr.nranks = nranks
        hdr.lag = lag
        hdr.desc_stride = lay["desc_stride"]
        hdr.arena_bytes = lay["arena_bytes"]
        hdr.segment_bytes = lay["segment_bytes"]
        hdr.descs_offset = lay["descs_offset"]
        hdr.arenas_offset = lay["arenas_offset"]
        hdr.mbox_offset = lay["mbox_offset"]
        # The magic goes last: an attacher that sees it sees the fields above.
        bls_store_release(&hdr.magic, BLS_MAGIC)
    finally:
        PyBuffer_Release(&buf)


cdef inline void _put(tuple items, Py_ssize_t i, object item) noexcept:
    """Set ``items[i]`` of a tuple being filled (new, or ours alone), releasing what it held."""
    cdef PyObject* old = PyTuple_GET_ITEM(items, i)
    Py_INCREF(item)  # PyTuple_SET_ITEM steals a reference
    PyTuple_SET_ITEM(items, i, item)
    Py_XDECREF(old)


cdef class Core:
    """One rank's end of a communicator: the collectives, in Cython.

    :class:`blsshm.Comm` derives from it and adds creation, attaching,
    zero-copy views and lifetime; users never make a ``Core`` themselves.
    Methods validate every argument before anything is published and raise
    :mod:`blsshm.errors` exceptions.
    """
    cdef Py_buffer buf
    cdef bint have_buf
    cdef char* base
    cdef bls_header_t* hdr
    cdef bls_abort_t* abort_line
    cdef bls_rank_t* ranks
    cdef char* descs
    cdef bls_mbox_t* mboxes    # NULL when the segment has none
    cdef char* arenas
    cdef readonly int rank
    cdef readonly int size
    cdef readonly int lag
    cdef readonly uint64_t arena_bytes
    cdef uint64_t desc_stride
    cdef uint64_t segment_bytes
    cdef int* pidfds
    cdef int lock_fd            # our descriptor of the segment: holds our liveness lock, tests the peers'
    cdef bint closed
    cdef int owner_pid          # the process that attached (a forked child is not it)
    cdef bint forked            # this is a forked child's copy: it may only be closed
    cdef int busy               # calls in progress: Python code they run (a signal handler,
                                # an __index__, a finalizer) may close us in the middle
    cdef bint release_pending   # closed during a call: free our buffers when it returns
    cdef str operation          # the call in progress, as the user made it (_enter): messages name it
    cdef uint32_t abort_claimed # a thread of ours writes our abort fields (one only: see _abort_nogil)

    # local state of this rank's sends
    cdef readonly uint64_t next_post
    cdef readonly uint64_t next_complete
    cdef uint64_t slots         # descriptor and mailbox slots per sender (_slot_count)
    cdef uint64_t slot_mask     # slots - 1 if slots is a power of two, else 0 (see _slot)
    cdef uint64_t* fl_iter      # in-flight records, oldest at fl_first (ring of `slots`)
    cdef uint64_t* fl_start
    cdef uint64_t* fl_end
    cdef int fl_first
    cdef int fl_count
    cdef uint64_t arena_head
    cdef uint64_t known_completed  # every rank had completed this many iterations when last read
    cdef object slot_dtype      # dtype posted per iteration slot (list of `slots`)
    cdef object slot_torch      # whether that post was a torch tensor (list of `slots`)
    cdef object default_timeout  # comm.timeout: of every wait, seconds or None (checked)
    cdef public bint ready      # all ranks attached; set by Comm._make_ready
    cdef bint fence_free  # this rank announces with a compiler barrier only (_announce)
    cdef dict dtype_cache       # descriptor dtype string -> numpy dtype (zero-copy receive)
    cdef object view_base       # read-only memoryview of the whole mapping: the base of every view
    cdef uint64_t acquired_bytes
    cdef bint acquired          # inside complete_views(next_complete): its views read the blocks
    cdef object last_dtype      # the last dtype validated, and its descriptor string
    cdef bytes last_dtype_str
    cdef object last_dtype_arg  # the last dtype argument of post_views, and its dtype
    cdef object last_dtype_arg_resolved
    cdef object last_recv_dtype # the last dtype a sender sent us, and its string
    cdef bytes last_recv_dtype_str
    cdef object last_recv_counts  # see _recv_counts
    cdef object last_result     # see _result
    cdef object last_timeout    # the last timeout argument validated, and its ns
    cdef int64_t last_timeout_ns
    cdef uint64_t pending_start # a reservation made by reserve(), not yet committed
    cdef uint64_t pending_bytes
    cdef bint pending_inline    # the pending post's blocks go in mailboxes, not a record
    cdef bint last_streamed     # the last post copied with streaming stores (see _claim_next_lines)
    cdef bint pending

    # scratch of size P: the record being posted, and the blocks being received
    cdef int64_t* counts
    cdef uint64_t* block_off
    cdef uint64_t* recv_off
    cdef uint64_t* recv_bytes

    # waiting policy
    cdef public int64_t spin_ns   # how long a wait spins before it sleeps
    cdef public int64_t pause_ns  # longest pause between yields while spinning
    cdef public int64_t slice_ns  # longest futex sleep between liveness checks
    # Tests only (0 otherwise): spin this long between a sleep's last look at
    # the words it sleeps on and the futex call, to widen the window in which
    # an abort or a close must not be missed.
    cdef public int64_t sleep_gap_ns
    cdef int lost_rank
    cdef int unfit_block        # the first block just parsed that a record could not hold, or -1
    cdef int late_rank          # the rank a wait still waited for when it timed out
    cdef int64_t next_liveness_ns  # when arrived() may next ask whether the ranks behind live
    cdef int64_t next_post_liveness_ns  # when post may next ask whether every peer lives
    cdef uint32_t closes_at_post  # the count of closed ranks when a post last looked
    cdef const char* own_src    # a blocking alltoallv's own block, not yet copied (see _scatter)
    cdef char* own_rec          # where it belongs in the record
    cdef uint64_t own_bytes
    cdef uint32_t cpu_hint      # what this rank last published as its CPU (see _wait)
    # direct reads (see BLS_DIRECT_* in _layout.h)
    cdef uint64_t direct_min  # offer blocks this big (0: never); direct_min_bytes sets it
    cdef public bint permit_peer_reads  # before the first offer, _proc.allow_peer_reads (then False)
    cdef char* direct_peer      # per rank: we may offer it blocks (same PID namespace, never refused)
    cdef const char** offered   # per rank: the send bytes offered to it by the call in progress, or NULL
    cdef bint offers_pending    # some offered[q] is not NULL
    cdef uint64_t offered_t     # the iteration of those offers
    cdef char* recv_direct      # per source: its block of the complete in progress is offered to us
    cdef bint read_direct       # the gather in progress read a block directly (none can be read again)
    cdef int give_way_misses    # _give_way_to_readers: yields in a row after which no offer was claimed
    cdef int give_way_skips     # withdrawals left that do not yield (after GIVE_WAY_MISSES misses)
    cdef int64_t next_spread_ns  # when _spread_out may next look at the spread
    cdef int spread_cpus[SPREAD_MAX_CPUS]   # scratch for _spread_out
    cdef int spread_count[SPREAD_MAX_CPUS]

    # copy policy for blocks to other ranks (see _copy_strategy)
    cdef int copy_mode          # COPY_CACHED, COPY_STREAM or COPY_AUTO
    cdef double copy_cost[2 * COPY_SAMPLES]  # ns per byte, the last samples of each strategy; 0 = none
    cdef int copy_next[2]       # where each strategy's next sample goes
    cdef uint32_t copy_choices

    # statistics
    cdef readonly int64_t post_wait_ns
    cdef readonly int64_t complete_wait_ns
    cdef readonly int64_t futex_sleeps
    cdef readonly int64_t cpu_moves
    cdef readonly uint64_t bytes_sent
    cdef readonly uint64_t bytes_received
    cdef readonly uint64_t bytes_streamed
    cdef readonly uint64_t bytes_read_direct

    def __cinit__(self):
        self.have_buf = False
        self.late_rank = -1
        self.pidfds = NULL
        self.lock_fd = -1
        self.fl_iter = NULL
        self.fl_start = NULL
        self.fl_end = NULL
        self.counts = NULL
        self.block_off = NULL
        self.recv_off = NULL
        self.recv_bytes = NULL
        self.closed = True
        self.dtype_cache = {}
        self.copy_mode = COPY_AUTO

    def _attach_mapping(self, segment, int rank, int lock_fd=-1, uint64_t pid_ns=0,
                        int64_t expected_size=-1, str size_source="size"):
        """Claim ``rank`` in the mapped segment (a writable buffer).

        ``lock_fd``, an open descriptor of the segment of this rank's own
        (kept open while the rank lives), carries its liveness lock and tests
        the peers'; ``pid_ns`` names this process's PID namespace (0: unknown).
        With ``expected_size`` >= 0, a segment of another size is refused
        before the rank is claimed (``size_source`` names where it came from).
        """
        # Views hold this memoryview, which holds an export of the mapping:
        # the memory cannot be unmapped while a view lives.  It is read-only,
        # so numpy refuses to make a view writable again once its flag is
        # clear (a published send view, any received view).
        self.view_base = memoryview(segment).toreadonly()
        PyObject_GetBuffer(segment, &self.buf, PyBUF_WRITABLE)
        self.have_buf = True
        try:
            self._bind(rank, lock_fd, pid_ns, expected_size, size_source)  # claiming the rank is its last step
        except BaseException:
            self.closed = True
            self.view_base = None
            self._release()
            raise

    cdef int _bind(self, int rank, int lock_fd, uint64_t pid_ns, int64_t expected_size,
                   str size_source) except -1:
        self.base = <char*>self.buf.buf
        self.hdr = <bls_header_t*>self.base
        if <uint64_t>self.buf.len < 2 * BLS_LINE or bls_load_acquire(&self.hdr.magic) != BLS_MAGIC:
            raise BlsValueError("not a blsshm segment (bad magic)")
        if self.hdr.version != BLS_VERSION:
            raise BlsValueError(
                f"segment layout version {self.hdr.version}, this blsshm speaks {BLS_VERSION}")
        lay = layout(self.hdr.nranks, self.hdr.lag, self.hdr.arena_bytes)
        if (lay["segment_bytes"] != self.hdr.segment_bytes
                or lay["descs_offset"] != self.hdr.descs_offset
                or lay["arenas_offset"] != self.hdr.arenas_offset
                or lay["mbox_offset"] != self.hdr.mbox_offset
                or lay["desc_stride"] != self.hdr.desc_stride
                or <uint64_t>self.buf.len < self.hdr.segment_bytes):
            raise BlsValueError("segment header does not match its size")
        self.size = self.hdr.nranks
        self.lag = self.hdr.lag
        self.slots = _slot_count(self.lag)
        self.slot_mask = self.slots - 1 if self.slots & (self.slots - 1) == 0 else 0
        if expected_size >= 0 and expected_size != self.size:
            raise BlsValueError(f"{size_source} is {expected_size} but the segment has {self.size} ranks")
        if rank < 0 or rank >= self.size:
            raise BlsValueError(f"rank must be in [0, {self.size}), got {rank}")
        self.rank = rank
        self.arena_bytes = self.hdr.arena_bytes
        self.desc_stride = self.hdr.desc_stride
        self.segment_bytes = self.hdr.segment_bytes
        self.abort_line = <bls_abort_t*>(self.base + BLS_LINE)
        self.ranks = <bls_rank_t*>(self.base + 2 * BLS_LINE)
        self.descs = self.base + self.hdr.descs_offset
        self.arenas = self.base + self.hdr.arenas_offset
        self.mboxes = <bls_mbox_t*>(self.base + self.hdr.mbox_offset) if self.hdr.mbox_offset else NULL
        self.spin_ns = DEFAULT_SPIN_NS
        self.pause_ns = DEFAULT_PAUSE_NS
        self.slice_ns = DEFAULT_SLICE_NS
        self.fl_iter = <uint64_t*>calloc(1, self.slots * sizeof(uint64_t))
        self.fl_start = <uint64_t*>calloc(1, self.slots * sizeof(uint64_t))
        self.fl_end = <uint64_t*>calloc(1, self.slots * sizeof(uint64_t))
        self.counts = <int64_t*>calloc(1, self.size * sizeof(int64_t))
        self.block_off = <uint64_t*>calloc(1, self.size * sizeof(uint64_t))
        self.recv_off = <uint64_t*>calloc(1, self.size * sizeof(uint64_t))
        self.recv_bytes = <uint64_t*>calloc(1, self.size * sizeof(uint64_t))
        self.pidfds = <int*>calloc(1, self.size * sizeof(int))
        self.direct_peer = <char*>calloc(1, self.size)
        self.recv_direct = <char*>calloc(1, self.size)
        self.offered = <const char**>calloc(1, self.size * sizeof(char*))
        self.direct_min = DIRECT_MIN_BYTES
        if self.pidfds != NULL:  # before anything can fail: _release closes those >= 0
            for r in range(self.size):
                self.pidfds[r] = -1
        if (self.fl_iter == NULL or self.fl_start == NULL or self.fl_end == NULL
                or self.counts == NULL or self.block_off == NULL or self.pidfds == NULL
                or self.recv_off == NULL or self.recv_bytes == NULL
                or self.direct_peer == NULL or self.recv_direct == NULL or self.offered == NULL):
            raise MemoryError()
        self.slot_dtype = [None] * <Py_ssize_t>self.slots
        self.slot_torch = [False] * <Py_ssize_t>self.slots
        # Claim the rank with a CAS on its pid (guards against two processes
        # attaching as one rank), then say "attached" with a release store so
        # whoever acquires the state also sees the pid.
        cdef bls_rank_t* me = &self.ranks[rank]
        # Registering may wait for an RCU grace period (ms): before the rank
        # is claimed, so a death in it never leaves a claimed rank unattached.
        if fence_free_allowed:
            with nogil:
                self.fence_free = bls_membarrier_register()
        if not bls_cas32(<uint32_t*>&me.pid, 0, <uint32_t>getpid()):
            raise BlsValueError(f"rank {rank} is already attached to this segment")
        # Where the lock cannot be had, peers are told so and never read a
        # missing lock as a death (they still see a CLOSED state or time out).
        self.lock_fd = lock_fd
        me.holds_lock = lock_fd >= 0 and bls_lock_hold(lock_fd, rank) == 0
        me.pid_ns = pid_ns
        # Before the state's release store, so a rank that acquired our state
        # (every rank does before its first wait) reads the flag settled.
        me.fence_free = self.fence_free
        bls_store_release32(&me.state, BLS_STATE_ATTACHED)
        # Full fence: the caller reads every rank's state next, to learn
        # whether it attached last and must unlink the name.  A release store
        # may be passed by those later loads (x86 reorders store-load too), so
        # two ranks attaching at once could each miss the other, and neither
        # unlink it until a start-up barrier did.
        bls_fence()
        self.owner_pid = getpid()
        self.closed = False
        return 0

    def __dealloc__(self):
        self._release()

    cdef void _release(self):
        cdef int r
        if self.have_buf:
            PyBuffer_Release(&self.buf)
            self.have_buf = False
        free(self.fl_iter)
        free(self.fl_start)
        free(self.fl_end)
        free(self.counts)
        free(self.block_off)
        free(self.recv_off)
        free(self.recv_bytes)
        free(self.direct_peer)
        free(self.recv_direct)
        free(<void*>self.offered)
        self.direct_peer = self.recv_direct = NULL
        self.offered = NULL
        if self.pidfds != NULL:
            for r in range(self.size):
                if self.pidfds[r] >= 0:
                    close(self.pidfds[r])
        free(self.pidfds)
        self.fl_iter = self.fl_start = self.fl_end = NULL
        self.counts = NULL
        self.block_off = self.recv_off = self.recv_bytes = NULL
        self.pidfds = NULL
        self.last_result = None  # its arrays: see _result

    # ------------------------------------------------------------------ setup

    def _attached_ranks(self):
        """Ranks that have attached so far (state read with acquire)."""
        self._check_mapped()
        return [r for r in range(self.size)
                if bls_load_acquire32(&self.ranks[r].state) != BLS_STATE_EMPTY]

    def _peer_pids(self):
        """``(pid, pid_ns)`` as each rank recorded them when it attached."""
        self._check_mapped()
        return [(self.ranks[r].pid, self.ranks[r].pid_ns) for r in range(self.size)]

    def _lock_released(self, int r):
        """Whether rank ``r`` held its liveness lock and no longer does (closed or exited)."""
        self._check_mapped()
        return (self.lock_fd >= 0 and self.ranks[r].holds_lock
                and bls_lock_released(self.lock_fd, r) == 1)

    def _lose_the_departed(self):
        """Before every rank attached: abort, naming it, if a rank that attached has closed or exited.

        The start-up barrier asks this between its looks (``Comm._make_ready``,
        ``_poll_ready``), as a wait asks ``_check_alive``: such a rank never
        takes part, and a creator that leaves takes the name with it, so the
        ranks still missing may never come.  True if it aborted.
        """
        self._check_mapped()
        cdef int r
        cdef uint32_t state
        for r in range(self.size):
            if r == self.rank:
                continue
            # Acquire: its pid, lock and namespace, stored before, are read after.
            state = bls_load_acquire32(&self.ranks[r].state)
            if state == BLS_STATE_CLOSED or (state == BLS_STATE_ATTACHED and self._exited(r)):
                self.lost_rank = r
                self._abort_nogil(BLS_ABORT_PEER_LOST, r,
                                  b"it closed the communicator before every rank attached"
                                  if bls_load_acquire32(&self.ranks[r].state) == BLS_STATE_CLOSED
                                  else b"its process exited before every rank attached")
                return True
        return False

    def _forget_lock_fd(self):
        """Stop using the lock descriptor (a forked child closes its copy)."""
        self.lock_fd = -1

    cdef int _check_mapped(self) except -1:
        """Raise if the mapping is gone (closed): the shared lines must not be read then."""
        if self.closed:
            raise BlsValueError(f"rank {self.rank} is closed")
        return 0

    def _set_pidfds(self, list fds):
        """Hand over the pidfds of the peers (``-1`` for self) used to detect a dead rank.

        They are ours from then on: closed with the communicator, or when
        replaced; if this refuses them (closed meanwhile), it closes them.
        No Python code runs between the check and the hand-over.
        """
        cdef int fd
        if self.closed or len(fds) != self.size:
            for fd in fds:
                if fd >= 0:
                    close(fd)
            self._check_mapped()
            raise BlsValueError("one pidfd per rank")
        for r in range(self.size):
            fd = fds[r]
            if self.pidfds[r] >= 0 and self.pidfds[r] != fd:
                close(self.pidfds[r])
            self.pidfds[r] = fd
            # A pid names a process only in its own namespace: a rank in
            # another one cannot be read directly (nor read us by our pid).
            self.direct_peer[r] = (r != self.rank and self.ranks[r].pid_ns != 0
                                   and self.ranks[r].pid_ns == self.ranks[self.rank].pid_ns)

    def _close_core(self):
        """Mark this rank closed and wake every sleeper so nobody waits on it."""
        if self.closed:
            return
        self.closed = True
        if getpid() == self.owner_pid:  # a forked child only drops its copy
            bls_store_release32(&self.ranks[self.rank].state, BLS_STATE_CLOSED)
            bls_store_relaxed32(&self.ranks[self.rank].cpu_hint, 0)  # shares no CPU any more
            # After the state (a sequentially consistent add, so it also orders
            # the state before it): a sleeper that read the count before looking
            # at our state either saw CLOSED, or sleeps expecting the old count,
            # which the kernel then finds changed or our wake finds queued.
            bls_add32(&self.abort_line.closes, 1)
            self._wake_everyone()
        self.view_base = None  # views handed out keep the mapping alive themselves
        if self.busy:
            # Closed from inside one of our calls (a signal handler, or any
            # Python code it ran), which still uses our arrays and the segment
            # (mapped while we hold its buffer): it releases them when it
            # returns (_leave), after raising at its next shared write.
            self.release_pending = True
        else:
            self._release()

    cdef inline int _enter(self, str operation) except -1:
        """Begin a call: count it ``busy``, refusing one that would nest in another.

        A signal handler (or another thread, while a wait releases the GIL)
        calling us in the middle of a call would overwrite the call's scratch
        (counts, offsets, ``next_post``): the outer call would then copy with
        the inner one's counts, past its reservation.  ``close()`` and
        ``abort()`` stay allowed: they are how a handler stops a wait.
        """
        if self.busy:
            raise BlsError(f"{operation}() called while another call on this communicator is in "
                           f"progress (from a signal handler or another thread); a communicator "
                           f"serves one call at a time: only close() and abort() may interrupt one")
        self.busy += 1
        self.operation = operation
        return 0

    cdef str _call_name(self, str phase, int64_t t):
        """The call a message names: the user's, not the internal ``phase`` that raised.

        ``complete_views(3)`` rather than ``complete(3)``; ``alltoallv()
        (iteration 3)`` rather than its post's or its complete's ``(3)``:
        ``alltoallv`` takes no iteration.  ``phase`` outside a call.
        """
        cdef str op = self.operation if self.busy else phase
        if op == "alltoallv":
            return f"alltoallv() (iteration {t})"
        return f"{op}({t})"

    cdef inline void _leave(self) noexcept:
        """End a call that counted itself ``busy``; release what a close during it left."""
        self.busy -= 1
        if self.release_pending and not self.busy:
            self.release_pending = False
            self._release()

    cdef int _check_not_closed_during(self, str operation, int64_t t) except -1:
        """Raise if a signal handler (or other Python code) closed us during this call."""
        if self.closed:
            raise BlsError(f"communicator was closed during {self._call_name(operation, t)} "
                           f"(by a signal handler)")
        return 0

    def _mark_forked(self):
        """This object is a forked child's copy: refuse every call but ``close``."""
        self.forked = True

    def _check(self):
        """Raise if this rank closed or the communicator was aborted."""
        self._check_open()

    @property
    def _core_closed(self):
        return self.closed

    # -------------------------------------------------------------- aborting

    cdef void _wake_everyone(self) noexcept nogil:
        """Wake every sleeper, after an abort or a close changed the word it says."""
        cdef int r
        # Sleepers wait on the abort word and the closes count too (futex_waitv),
        # which is what closes the window between their last look and their
        # sleep; the counters are woken for kernels without it.
        bls_futex_wake_all32(&self.abort_line.word)
        bls_futex_wake_all32(&self.abort_line.closes)
        for r in range(self.size):
            bls_futex_wake_all(&self.ranks[r].published)
            bls_futex_wake_all(&self.ranks[r].completed)

    cdef void _abort_nogil(self, uint32_t kind, int lost_rank, const char* reason) noexcept nogil:
        cdef bls_rank_t* me = &self.ranks[self.rank]
        # Aborted already: the first reason stands, and if it was ours, others
        # may be reading our fields now.  (Only we write them, so if the word
        # is still 0 nobody reads them yet.)
        if self._aborted():
            return
        # Two of our threads may abort at once (a wait that finds a peer dead
        # without the GIL, and abort() from another thread): the second must
        # not write the fields the first's CAS has just published.  It waits
        # for that CAS (a few stores away) instead, so that callers may rely
        # on what this returns to: an aborted communicator (one that
        # abandons a read must not let its reader see no abort).
        if bls_exchange32(&self.abort_claimed, 1) != 0:
            while not self._aborted():
                bls_yield()  # it may share our CPU
            return
        me.abort_kind = kind
        me.abort_lost_rank = lost_rank
        strncpy(me.abort_reason, reason, BLS_REASON_CHARS - 1)
        # The CAS (acq_rel) publishes the fields above to whoever acquires the word.
        if bls_cas32(&self.abort_line.word, 0, self.rank + 1):
            bls_fence()
            self._wake_everyone()

    def _abort(self, str reason="aborted", int kind=BLS_ABORT_USER, int lost_rank=-1):
        """Abort the communicator: in every rank, later posts and unmet waits raise.

        Does nothing if it was aborted already (the first reason stands).
        """
        self._check_owner()
        if self._aborted():
            return
        data = _reason_bytes(reason)
        self._abort_nogil(kind, lost_rank, data)

    cdef inline bint _aborted(self) noexcept nogil:
        return bls_load_acquire32(&self.abort_line.word) != 0

    def _abort_info(self):
        """``None`` while running, else ``(rank, kind, lost_rank, reason)`` of the first abort."""
        if not self.have_buf:
            return None
        cdef uint32_t w = bls_load_acquire32(&self.abort_line.word)
        if w == 0 or w > <uint32_t>self.size:
            return None
        cdef bls_rank_t* a = &self.ranks[w - 1]
        reason = (<bytes>(<char*>a.abort_reason)).decode("utf-8", "replace")
        return (w - 1, a.abort_kind, a.abort_lost_rank, reason)

    cdef int _raise_aborted(self) except -1:
        rank, kind, lost, reason = self._abort_info()
        message = _abort_text(rank, kind == BLS_ABORT_PEER_LOST, lost, reason)
        if kind == BLS_ABORT_PEER_LOST:
            raise PeerLostError(message, rank=rank, reason=reason, lost_rank=lost)
        raise CommAborted(message, rank=rank, reason=reason)

    cdef int _check_owner(self) except -1:
        if self.closed:
            raise BlsError("communicator is closed")
        if self.forked:
            # Its posts would be the parent's rank's posts: peers would take
            # them for the parent's data, and the parent would repeat them.
            raise BlsError(f"communicator belongs to process {self.owner_pid}: a child made by "
                           f"os.fork may only close it (create or attach a new one instead)")
        return 0

    cdef int _check_open(self) except -1:
        self._check_owner()
        if self._aborted():
            self._raise_aborted()
        return 0

    # ---------------------------------------------------------------- waiting

    cdef inline uint64_t* _counter(self, int which, int r) noexcept nogil:
        if which == PUBLISHED:
            return &self.ranks[r].published
        return &self.ranks[r].completed

    cdef inline uint32_t* _sleepers(self, int which, int r) noexcept nogil:
        if which == PUBLISHED:
            return &self.ranks[r].published_sleepers
        return &self.ranks[r].completed_sleepers

    cdef inline bint _behind(self, int which, uint64_t target, uint64_t slot, int r) noexcept nogil:
        """Whether rank ``r`` has not yet posted (PUBLISHED) or completed ``target`` iterations.

        Posts are read from the stamps of iteration ``target - 1``'s slot
        (``slot``) rather than from ``published``: our mailbox from each
        sender, whose line also carries a small block (one transfer, not two
        or three), or without mailboxes the sender's descriptor stamp.
        The slot cannot hold a later iteration while we wait for this one
        (its sender would need our completion of it first), and a later one
        only ever means "posted" when asked about the past (``arrived``).
        """
        # Acquire: once a count or stamp is seen, everything its writer did
        # before storing it (record bytes and descriptor, or finishing its
        # reads) is visible/done.
        if which == PUBLISHED:
            if self.mboxes != NULL:  # our own line from each sender: stamp and small block
                return bls_load_acquire(&self._mbox(r, self.rank, slot).stamp) < target
            return bls_load_acquire(&self._desc_in_slot(r, slot).stamp) < target
        return bls_load_acquire(&self.ranks[r].completed) < target

    cdef inline int _first_behind(self, int which, uint64_t target, int r) noexcept nogil:
        """The first rank from ``r`` on that is ``_behind``, or -1."""
        cdef uint64_t slot = self._slot(target - 1) if which == PUBLISHED else 0
        while r < self.size:
            if self._behind(which, target, slot, r):
                return r
            r += 1
        return -1

    cdef inline bint _exited(self, int r) noexcept nogil:
        """Rank ``r``'s process is gone: by its pidfd, or by its liveness
        lock, else (in our PID namespace) by its pid.

        A rank in another namespace that could not take its lock is never
        declared dead here: its CLOSED state or a timeout still ends a wait.
        """
        if self.pidfds[r] >= 0 and bls_pidfd_exited(self.pidfds[r]) == 1:
            return True
        # Asked even with a pidfd: a rank that exec()s lives on under its pid,
        # but the exec closed its lock (and unmapped us): it is gone as a rank.
        if self.lock_fd >= 0 and self.ranks[r].holds_lock:
            return bls_lock_released(self.lock_fd, r) == 1
        if self.pidfds[r] >= 0:
            return False
        if self.ranks[r].pid_ns != 0 and self.ranks[r].pid_ns == self.ranks[self.rank].pid_ns:
            return bls_pid_exited(self.ranks[r].pid) == 1
        return False

    cdef int _check_alive(self, int which, uint64_t target, int r, bint poll_pids) noexcept nogil:
        """ERR_LOST (and lost_rank set) if a rank we still wait for closed or died."""
        # "Still wait for" is judged as the wait judges it (_behind: for posts
        # the record's stamps, which a sender stores before its count), so a
        # rank killed between the two stores has posted.  It may reach the
        # target, then close or exit, between our first look and our look at
        # its state: so we look again after the state.  That second look is
        # final: a rank stores its stamps and counts before its CLOSED state
        # (release; we acquire the state), and a process that exited stores
        # nothing more.
        cdef bint closed
        cdef uint64_t slot = self._slot(target - 1) if which == PUBLISHED else 0
        while r < self.size:
            # Never ourselves (arrived(t) before our own post(t) counts us
            # behind): we live, and our lock, held through this very file
            # description, would look released to the query (F_OFD_GETLK).
            if r != self.rank and self._behind(which, target, slot, r):
                closed = bls_load_acquire32(&self.ranks[r].state) == BLS_STATE_CLOSED
                if ((closed or (poll_pids and self._exited(r)))
                        and self._behind(which, target, slot, r)):
                    # A rank that closed as we asked about its process: say it closed.
                    closed = closed or bls_load_acquire32(&self.ranks[r].state) == BLS_STATE_CLOSED
                    self.lost_rank = r
                    self._abort_nogil(BLS_ABORT_PEER_LOST, r,
                                      b"it closed the communicator while others waited for it" if closed
                                      else b"its process exited (or exec'd another program)")
                    return ERR_LOST
            r += 1
        return OK

    cdef bint _behind_on_cpu(self, int which, uint64_t target, int r, uint32_t cpu) noexcept nogil:
        """Whether a rank from ``r`` on that is ``_behind`` last waited on CPU ``cpu`` (a ``cpu_hint``).

        Such a rank cannot run while we hold the CPU, so pausing for it is
        useless.  A rank behind on another CPU is probably running there
        (hints are refreshed only when a rank waits, so one may be stale):
        that is worth a short pause, never longer than ``pause_ns``.
        """
        if cpu == 0:  # sched_getcpu failed
            return False
        cdef uint64_t slot = self._slot(target - 1) if which == PUBLISHED else 0
        while r < self.size:
            if (r != self.rank and bls_load_relaxed32(&self.ranks[r].cpu_hint) == cpu
                    and self._behind(which, target, slot, r)):
                return True
            r += 1
        return False

    cdef uint32_t _spread_out(self, uint32_t cpu, int64_t now) noexcept nogil:
        """Move this rank off a CPU crowded with our ranks; the CPU it runs on now (+ 1, as ``cpu``).

        Why the kernel can leave ranks 3 + 1 on two CPUs is in ``_spread.h``;
        at lag 0 with 4 ranks on 2 cores, 64 B, that took 25 us per iteration
        against 8.7 us spread 2 + 2 (``python tools/spread.py --crowd --stay``
        and ``--runs 16``).  So at most
        once per SPREAD_CHECK_NS a waiting rank counts our ranks on each CPU
        it may use, from their hints.  If its CPU holds at least 2 more than
        the emptiest one, the highest rank there (one mover per CPU, chosen
        alike by all from the same hints) moves to the emptiest, and then
        leaves the kernel alone for SPREAD_SETTLE_NS.  Hints are refreshed
        only when ranks wait, so one may be stale: the cost of a wrong move
        is one migration, and the kernel may move the rank back.
        """
        if self.size < 2 or cpu == 0 or now < self.next_spread_ns:
            return cpu
        self.next_spread_ns = now + SPREAD_CHECK_NS
        cdef int ncpus = bls_allowed_cpus(self.spread_cpus, SPREAD_MAX_CPUS)
        if ncpus < 2:
            return cpu
        memset(self.spread_count, 0, ncpus * sizeof(int))
        cdef int here = -1   # our CPU's index in spread_cpus
        cdef int mover = -1  # the highest rank on our CPU
        cdef int q, i, lo, hi, mid
        cdef uint32_t hint
        for q in range(self.size):
            hint = bls_load_relaxed32(&self.ranks[q].cpu_hint)
            if hint == 0:
                continue
            lo, hi = 0, ncpus  # binary search: spread_cpus is ascending
            while lo < hi:
                mid = (lo + hi) // 2
                if self.spread_cpus[mid] < <int>hint - 1:
                    lo = mid + 1
                else:
                    hi = mid
            if lo < ncpus and self.spread_cpus[lo] == <int>hint - 1:
                self.spread_count[lo] += 1
                if hint == cpu:
                    here, mover = lo, q
        if here < 0 or mover != self.rank:
            return cpu
        cdef int emptiest = 0
        for i in range(1, ncpus):
            if self.spread_count[i] < self.spread_count[emptiest]:
                emptiest = i
        if self.spread_count[here] < self.spread_count[emptiest] + 2:
            return cpu
        if bls_move_to_cpu(self.spread_cpus[emptiest]) != 0:
            return cpu
        self.cpu_moves += 1
        self.next_spread_ns = now + SPREAD_SETTLE_NS
        return self._publish_cpu()

    cdef inline uint32_t _publish_cpu(self) noexcept nogil:
        """This rank's CPU + 1 (0: unknown), published as its ``cpu_hint`` when it changed."""
        # CPUs are hints, published only when they change and read relaxed:
        # no data depends on them.
        cdef uint32_t cpu = <uint32_t>(bls_current_cpu() + 1)
        if cpu != self.cpu_hint:
            self.cpu_hint = cpu
            bls_store_relaxed32(&self.ranks[self.rank].cpu_hint, cpu)
        return cpu

    cdef int _wait(self, int which, uint64_t target, int64_t deadline_ns,
                   int64_t hold_ns=-1) noexcept nogil:
        """Wait until every rank has posted (PUBLISHED: its stamps) or completed ``target`` iterations.

        Spins for ``spin_ns``.  While the ranks still behind run on other
        CPUs it only pauses between checks (the answer is usually a
        cache-line transfer away), calling ``sched_yield`` every ``pause_ns``
        so that other work gets the CPU.  It yields at once while one of
        them last waited on our CPU: that rank can run only if we give way.
        Then sleeps on the futex of the first rank still behind (its
        ``published`` or ``completed``, stored after its stamps) and on the
        abort word and the count of closes, in slices of ``slice_ns``,
        re-checking the abort word and whether the ranks behind live.
        With ``hold_ns`` >= 0 it is the first phase of a wait, run holding
        the GIL: it returns STILL_WAITING after ``hold_ns`` or at the end of
        the spin, whichever comes first, and never sleeps.
        """
        cdef int r = self._first_behind(which, target, 0)
        if r < 0:
            return OK
        cdef int64_t start = bls_now_ns()
        cdef int64_t now = start
        cdef int64_t spin_until = start + self.spin_ns
        cdef int64_t pause_until = start + self.pause_ns
        cdef int64_t spin_poll = start + self.slice_ns  # a spin's first look at the peers' lives
        cdef int64_t hold_until = -1 if hold_ns < 0 else min(start + hold_ns, spin_until)
        # Pausing for a rank that shares our CPU only delays it, and yielding
        # to one that waits too (for other CPUs) costs a switch (1.4 us here)
        # for nothing.  4 ranks on 2 cores, 64 B, lag 0 (median of the
        # per-iteration maximum): 13 us pausing first, 9 us yielding from the
        # start whenever any rank shared our CPU, 5.3 us yielding only while
        # a rank we wait for does: 2 switches per core per iteration, the
        # least lag 0 allowed then.  Since a blocking alltoallv publishes
        # without waiting for completions (_reserve), it takes 1, as lag 1.
        cdef uint32_t cpu = self._spread_out(self._publish_cpu(), start)
        cdef bint give_way = self._behind_on_cpu(which, target, r, cpu)
        cdef int64_t next_poll = start
        cdef int64_t sleep_ns
        cdef int rc = OK
        cdef int i
        cdef int seen_r
        cdef uint64_t seen
        cdef uint64_t* counter
        cdef uint32_t* sleepers
        # 0, not the count now: a rank that closed before we began is looked for too.
        cdef uint32_t closes_seen = 0
        cdef uint32_t closes
        cdef bint interrupted = False
        while True:
            if self._aborted():
                # What was written before the abort is visible now (the word
                # is read with acquire; the aborting CAS is acq_rel), so one
                # more look tells for sure whether the wait is satisfied:
                # an iteration whose records all arrived still completes.
                # A post never goes on to publish into an aborted communicator.
                rc = ERR_ABORTED
                if which == PUBLISHED and self._first_behind(which, target, r) < 0:
                    rc = OK
                break
            if deadline_ns >= 0 and now >= deadline_ns:
                rc = ERR_TIMEOUT
                self.late_rank = r
                break
            if hold_until >= 0 and now >= hold_until:
                rc = STILL_WAITING
                break
            if now < spin_until:
                # A rank closed since we last looked (rare, and the count shares
                # the abort word's line, just read): is it one we wait for?
                # Acquire: the states _check_alive reads are read after it.
                closes = bls_load_acquire32(&self.abort_line.closes)
                if closes != closes_seen:
                    closes_seen = closes
                    rc = self._check_alive(which, target, r, False)
                    if rc != OK:
                        break
                if now >= spin_poll:
                    # A spin longer than a slice (spin_us is the user's) still
                    # finds a dead peer, and lets Ctrl-C in, once a slice.
                    spin_poll = now + self.slice_ns
                    rc = self._check_alive(which, target, r, True)
                    if rc == OK:
                        with gil:
                            if check_signals() != 0:
                                rc = ERR_SIGNAL
                            elif self.closed:
                                rc = ERR_CLOSED
                    if rc != OK:
                        break
                if not give_way and now < pause_until:
                    # One pause between checks: a pause costs 10-140 cycles
                    # depending on the CPU (25 ns on this project's Zen 4), and
                    # the count we wait for is one cache-line transfer (~50 ns)
                    # away once written.  The clock is read once per batch.
                    for i in range(SPIN_BATCH):
                        seen_r = r
                        r = self._first_behind(which, target, r)
                        if r < 0:
                            break
                        # A newly first rank behind: ask only about it (the
                        # others were asked when the wait began or last yielded),
                        # so a wait reads each hint O(1) times, not O(P).
                        if (r != seen_r and cpu != 0
                                and bls_load_relaxed32(&self.ranks[r].cpu_hint) == cpu):
                            give_way = True
                            break
                        bls_cpu_relax()
                    if r < 0:
                        break
                else:
                    bls_yield()
                    r = self._first_behind(which, target, r)
                    if r < 0:
                        break
                    cpu = self._publish_cpu()  # we may have moved
                    give_way = self._behind_on_cpu(which, target, r, cpu)
                    now = bls_now_ns()
                    pause_until = now + self.pause_ns
                    continue
                now = bls_now_ns()
                continue
            # Read before the states _check_alive looks at (acquire: those
            # loads stay after it), so a close we do not see there changes the
            # count after this read, and the sleep below cannot miss it.
            closes_seen = bls_load_acquire32(&self.abort_line.closes)
            rc = self._check_alive(which, target, r, now >= next_poll)
            if rc != OK:
                break
            if interrupted or now >= next_poll:
                # Let Python run its signal handlers (Ctrl-C's KeyboardInterrupt)
                # while we sleep: at least once per slice, and at once when a
                # signal cut a sleep short.  Sleeping is the slow path already.
                interrupted = False
                with gil:
                    if check_signals() != 0:
                        rc = ERR_SIGNAL
                    elif self.closed:  # by the handler: our arrays may be released on return
                        rc = ERR_CLOSED
                if rc != OK:
                    break
            if now >= next_poll:
                next_poll = now + self.slice_ns
            sleep_ns = next_poll - now
            if deadline_ns >= 0 and deadline_ns - now < sleep_ns:
                sleep_ns = deadline_ns - now
            counter = self._counter(which, r)
            sleepers = self._sleepers(which, r)
            # Sleep handshake with the writer (see _announce): register, full
            # fence, re-read.  Either we see its new count, or it sees us
            # registered and wakes us; the kernel re-checks the word too.
            # An abort or a close is covered the same way by the words beside
            # the counter (bls_futex_wait3): they were 0 and closes_seen when
            # we last looked, and whoever changes them wakes them.
            bls_add32(sleepers, 1)
            bls_fence()
            # A fence-free writer's fence is ours to run: a membarrier (see
            # _announce).  Its flag was written before its attach, whose
            # state every rank acquired before its first wait.
            if bls_load_relaxed32(&self.ranks[r].fence_free) and bls_membarrier_heavy() != 0:
                sleep_ns = min(sleep_ns, UNFENCED_SLEEP_NS)
            seen = bls_load_acquire(counter)
            if seen < target and not self._aborted():
                if self.sleep_gap_ns:
                    self._spin_for(self.sleep_gap_ns)
                interrupted = bls_futex_wait3(counter, <uint32_t>seen, &self.abort_line.word,
                                              &self.abort_line.closes, closes_seen,
                                              sleep_ns) == -1 and errno == EINTR
                self.futex_sleeps += 1
            bls_add32(sleepers, -1)
            now = bls_now_ns()
            r = self._first_behind(which, target, r)
            if r < 0:
                break
        now = bls_now_ns()
        if which == PUBLISHED:
            self.complete_wait_ns += now - start
        else:
            self.post_wait_ns += now - start
        return rc

    cdef int _await(self, int which, uint64_t target, int64_t timeout_ns, int64_t* deadline_ns,
                    str operation, uint64_t t) except -1:
        """``_wait`` that keeps the GIL when nothing needs waiting for (the common case).

        ``timeout_ns`` (-1: none) counts from the call's first wait: the clock
        is read only when a wait is needed, and ``*deadline_ns`` (NO_DEADLINE_YET
        until then) keeps one deadline for all the waits of one call.
        """
        cdef int rc
        if self._first_behind(which, target, 0) < 0:
            return 0
        if deadline_ns[0] == NO_DEADLINE_YET:
            deadline_ns[0] = -1 if timeout_ns < 0 else bls_now_ns() + timeout_ns
        # Most waits end within microseconds (a peer on another core is about
        # to post; one on our core runs when we yield), and handing the GIL
        # over and back costs more than that: a mutex, a condition signal and
        # errno saved and restored, 4-5% of all CPU time with 4 ranks on 2
        # cores.  So a wait first spins and yields holding it, for at most
        # HOLD_GIL_NS (CPython itself lets a thread keep it 5 ms), and only
        # then lets this process's other threads run.  Yielding the CPU while
        # holding it delays only those threads, by at most that long.
        # Signal handlers run in the second phase (in the first only when the
        # liveness slice is shorter than HOLD_GIL_NS); one that closes us
        # leaves our arrays to the call (busy), which must not go on.
        rc = self._wait(which, target, deadline_ns[0], HOLD_GIL_NS)
        if rc == STILL_WAITING:
            with nogil:
                rc = self._wait(which, target, deadline_ns[0])
        if rc != ERR_SIGNAL:
            self._check_not_closed_during(operation, t)
        if rc == ERR_SIGNAL:
            return -1  # the handler's exception (KeyboardInterrupt) is set: let it propagate
        if rc != OK:
            self._raise_wait(rc, which, target, operation, t)
        return 0

    cdef void _spin_for(self, int64_t ns) noexcept nogil:
        cdef int64_t end = bls_now_ns() + ns
        while bls_now_ns() < end:
            bls_cpu_relax()

    cdef inline void _announce(self, uint64_t* counter, uint32_t* sleepers, uint64_t value) noexcept nogil:
        """Store this rank's new count and wake sleepers, if any."""
        # Release: the record and descriptor (post), or our reads of the
        # senders' records (complete), happen before the new count is seen.
        bls_store_release(counter, value)
        # The store must be globally visible before we read the sleeper count,
        # or a waiter that registered and read the old count could be missed
        # (store-load ordering; release alone does not give it).  A full fence
        # does that, but waits for our stores to leave the store buffer, each
        # a cache miss on a line a peer reads.  A fence-free rank leaves the
        # CPU's part to the sleeper's membarrier (see _wait), which acts as a
        # fence here at some point of our program order: before our store
        # (we then read the sleeper's registration and wake it) or after it
        # (the sleeper's re-read then sees our new count).  Only the compiler
        # must keep the order, and this barrier makes it.  (P = 2, 64 B, the
        # two alternating in one run: 4 % less per alltoallv; P = 4: 1.5 %.)
        if self.fence_free:
            bls_compiler_barrier()
        else:
            bls_fence()
        if bls_load_relaxed32(sleepers) != 0:
            bls_futex_wake_all(counter)

    cdef int _raise_wait(self, int rc, int which, uint64_t target, str operation, uint64_t t) except -1:
        if rc == ERR_ABORTED or rc == ERR_LOST:
            self._raise_aborted()
        # The ranks still behind, and the one the wait saw behind at its
        # deadline: by now it may have caught up (a timeout of microseconds).
        behind = [r for r in range(self.size)
                  if bls_load_acquire(self._counter(which, r)) < target or r == self.late_rank]
        what = "post" if which == PUBLISHED else "complete"
        # A blocking alltoallv that timed out in its complete has posted t
        # (its docstring): say how to end it, which its name does not.
        then = (f"; iteration {t} stays posted: complete({t}) ends it"
                if self.busy and self.operation == "alltoallv" and operation == "complete" else "")
        raise BlsTimeoutError(
            f"{self._call_name(operation, t)} timed out waiting for rank(s) {behind} to {what} "
            f"iteration {target - 1}{then}", operation=operation, iteration=t, waiting_for=behind)

    cdef inline int64_t _timeout_ns(self, object timeout) except? -2:
        """``timeout`` (seconds or None) validated, in ns; -1 for None."""
        if timeout is None:
            return -1
        # Callers repeat theirs (often Comm.timeout); only immutable numbers are remembered.
        if timeout is self.last_timeout:
            return self.last_timeout_ns
        cdef double secs
        # The numbers Comm.create accepts (comm._is_real): True (an int) or
        # numpy.True_ would mean 1 s; a Decimal, a 0-d array or a string not.
        if _is_bool(timeout) or not isinstance(timeout, (int, float, np.integer, np.floating)):
            raise BlsTypeError(f"timeout must be a number of seconds or None, got {timeout!r}")
        try:
            secs = timeout
        except OverflowError:  # an int beyond any double: blocks if positive
            secs = 1e300 if timeout > 0 else -1.0
        if not secs >= 0:  # negative or NaN
            raise BlsValueError(f"timeout must be >= 0 or None, got {timeout}")
        cdef int64_t ns = -1 if secs > 3e9 else <int64_t>(secs * 1e9)  # a century blocks
        if type(timeout) is float or type(timeout) is int:
            self.last_timeout, self.last_timeout_ns = timeout, ns
        return ns

    # --------------------------------------------------------------- posting

    cdef int _parse_counts(self, object counts, int64_t itemsize, uint64_t* record_bytes,
                           int64_t elements=-1) except -1:
        """Fill self.counts (elements) and self.block_off (bytes); validate.

        ``elements``: how many ``send`` holds (-1: no ``send``, zero copy).  A
        count too big for any arena is first compared with it: one that
        exceeds ``send`` is a wrong count, and is named so rather than
        sending the user to ``arena_bytes``.
        A record too big for the arena is refused only by _reserve_blocks,
        once it knows the blocks do not all go in mailboxes instead.
        """
        cdef Py_ssize_t n
        cdef int q
        cdef int64_t c
        cdef uint64_t off = 0
        self.unfit_block = -1
        if cnp.PyArray_CheckExact(counts) and self._place_array(<cnp.ndarray>counts, itemsize, &off):
            record_bytes[0] = off
            return 0
        off = 0  # the general path below handles (or refuses) what the fast one left
        self.unfit_block = -1
        if type(counts) is not list and type(counts) is not tuple:
            # A tensor's elements are 0-d tensors that operator.index takes,
            # bools included: check its dtype as an array's instead.
            counts = tensor_as_array(counts, "send_counts")
        if isinstance(counts, cnp.ndarray):
            if counts.dtype.kind not in "iu":
                raise BlsTypeError(f"send_counts must hold integers, got dtype {counts.dtype}")
            if counts.ndim != 1:
                raise BlsValueError(f"send_counts must be one-dimensional ({self.size} integers), "
                                    f"got an array of shape {counts.shape}")
            counts = counts.tolist()
        if type(counts) is list or type(counts) is tuple:
            if len(counts) == self.size:
                for q in range(self.size):
                    item = counts[q]
                    if type(item) is not int:
                        break
                    try:
                        c = PyLong_AsLongLong(item)
                    except OverflowError:
                        break
                    if not self._place(q, c, itemsize, &off):
                        break
                else:
                    record_bytes[0] = off
                    return 0
                off = 0  # something unusual: the general path below says what
                self.unfit_block = -1
        # Indexable by 0..P-1 and sized, yet not counts: a dict's keys need
        # not be the ranks, and bytes or a str would be read character by character.
        if isinstance(counts, (Mapping, str, bytes, bytearray)):
            raise BlsTypeError(
                f"send_counts must be a sequence of {self.size} integers, got {type(counts).__name__}")
        try:
            n = len(counts)
        except TypeError:
            raise BlsTypeError(
                f"send_counts must be a sequence of {self.size} integers, got {type(counts).__name__}") from None
        if n != self.size:
            raise BlsValueError(
                f"send_counts has {n} entries; the communicator has {self.size} "
                f"rank{'' if self.size == 1 else 's'}")
        for q in range(self.size):
            try:
                item = counts[q]
            except (TypeError, KeyError, IndexError):
                raise BlsTypeError(
                    f"send_counts must be a sequence of {self.size} integers, got {type(counts).__name__}") from None
            try:
                if _is_bool(item):  # operator.index takes it as 0 or 1: surely a mistake
                    raise TypeError
                value = operator.index(item)
            except TypeError:
                raise BlsTypeError(f"send_counts[{q}] = {item!r} is not an integer") from None
            if value < 0:
                raise BlsValueError(f"send_counts[{q}] = {value} is negative")
            try:
                c = value  # OverflowError past int64
                fits = self._place(q, c, itemsize, &off)
            except OverflowError:
                fits = False
            if not fits:
                if elements >= 0 and value > elements:
                    raise BlsValueError(f"send_counts[{q}] = {value} elements but send holds {elements}")
                raise ArenaFullError(f"send_counts[{q}] = {value} elements of {itemsize} bytes are more "
                                     f"bytes than any arena holds")
        record_bytes[0] = off
        return 0

    cdef bint _place_array(self, cnp.ndarray counts, uint64_t itemsize, uint64_t* off) noexcept:
        """Lay out the blocks from a 1-D int64 or int32 array read in place; False if it is not one.

        The counts a program computes are often such an array (the received
        counts are one); going through ``tolist()`` and Python ints cost more
        than a small alltoallv itself.  False also for a negative or
        overflowing count: the general path then says which.
        """
        cdef int type_num = cnp.PyArray_TYPE(counts)
        cdef char* data = <char*>cnp.PyArray_DATA(counts)
        cdef cnp.npy_intp stride
        cdef int q
        if (cnp.PyArray_NDIM(counts) != 1 or cnp.PyArray_DIMS(counts)[0] != self.size
                or not cnp.PyArray_ISBEHAVED_RO(counts)):  # aligned, native byte order
            return False
        stride = cnp.PyArray_STRIDES(counts)[0]
        if type_num == cnp.NPY_INT64:
            for q in range(self.size):
                if not self._place(q, (<int64_t*>(data + q * stride))[0], itemsize, off):
                    return False
        elif type_num == cnp.NPY_INT32:
            for q in range(self.size):
                if not self._place(q, (<int32_t*>(data + q * stride))[0], itemsize, off):
                    return False
        else:
            return False
        return True

    cdef inline bint _place(self, int q, int64_t c, uint64_t itemsize, uint64_t* off) noexcept:
        """Lay out block ``q`` of ``c`` elements at ``*off``; False if its bytes overflow.

        A block that does not fit the arena after the blocks before it sets
        ``unfit_block`` (the first such) and fills the arena (``*off``, a
        multiple of 64, never exceeds it, so no count can wrap the arithmetic).
        """
        cdef uint64_t nbytes
        if c < 0 or bls_mul_overflow(<uint64_t>c, itemsize, &nbytes):
            return False
        self.counts[q] = c
        self.block_off[q] = off[0]
        if nbytes > self.arena_bytes - off[0]:
            if self.unfit_block < 0:
                self.unfit_block = q
            off[0] = self.arena_bytes
        else:
            off[0] = _round_up(off[0] + nbytes, BLS_BLOCK_ALIGN)
        return True

    cdef inline void _free_completed(self, uint64_t min_completed) noexcept nogil:
        """Drop in-flight records of iterations every rank has completed."""
        while self.fl_count > 0 and self.fl_iter[self.fl_first] < min_completed:
            self.fl_first = self._next_index(self.fl_first)
            self.fl_count -= 1
        if self.fl_count == 0:
            self.arena_head = 0

    cdef inline uint64_t _min_completed(self) noexcept nogil:
        cdef uint64_t m = <uint64_t>-1
        cdef uint64_t c
        cdef int r
        for r in range(self.size):
            c = bls_load_acquire(&self.ranks[r].completed)
            if c < m:
                m = c
        return m

    cdef inline bint _fit(self, uint64_t nbytes, uint64_t* start) noexcept nogil:
        """Find room for ``nbytes`` in the arena ring; never splits a record."""
        cdef uint64_t tail
        cdef int i = 0
        cdef int idx = self.fl_first
        # The ring's tail is the oldest record that occupies bytes: empty records
        # (all counts zero) hold no space, and head == tail then means "full".
        while i < self.fl_count and self.fl_end[idx] == self.fl_start[idx]:
            idx = self._next_index(idx)
            i += 1
        if i == self.fl_count:
            start[0] = 0
            return True
        tail = self.fl_start[idx]
        if self.arena_head > tail:
            # Wrap early, once the head is RECYCLE_BYTES or RECYCLE_RECORDS
            # records into the arena (see RECYCLE_BYTES), only when that
            # takes nothing from what (lag + 2) x the largest record
            # promises: the bytes left at the end stay unused until the
            # oldest record is free, so every record that may be posted
            # before then (slots - fl_count more) must fit before it, this
            # one included, if none is larger than the largest in flight.
            # And only once this rank has completed all it posted: a later,
            # larger record that does not fit then waits for the others'
            # completes, and never raises ArenaFullError.  Never for an
            # empty record: it would leave head == tail, which reads as full.
            if (nbytes != 0 and self.next_complete == self.next_post
                    and self.arena_head >= max(recycle_bytes, RECYCLE_RECORDS * nbytes)
                    and tail >= (self.slots - <uint64_t>self.fl_count) * self._largest_in_flight(nbytes)):
                start[0] = 0
                return True
            if self.arena_bytes - self.arena_head >= nbytes:
                start[0] = self.arena_head
                return True
            if tail >= nbytes:
                start[0] = 0
                return True
            return False
        if tail - self.arena_head >= nbytes:
            start[0] = self.arena_head
            return True
        return False

    cdef inline uint64_t _largest_in_flight(self, uint64_t nbytes) noexcept nogil:
        """The largest of ``nbytes`` and the records in flight."""
        cdef uint64_t largest = nbytes
        cdef int idx = self.fl_first
        cdef int i
        for i in range(self.fl_count):
            largest = max(largest, self.fl_end[idx] - self.fl_start[idx])
            idx = self._next_index(idx)
        return largest

    cdef int _reserve(self, uint64_t t, uint64_t nbytes, int64_t timeout_ns, int64_t* deadline_ns,
                      uint64_t* start, bint blocking) except -1:
        """Wait for the lag bound and for arena room; sets self.pending_*.  See _await for the deadline.

        ``blocking``: the post of a blocking alltoallv, which returns only
        once every rank posted ``t``; it waits only until its slot is free
        (``_slot_count``), which its last complete already knows, so it
        publishes at once unless the arena is full.  That call is
        still synchronous: it returns after every rank posted ``t``, and each
        did so only after completing ``t - 1`` itself.
        """
        cdef uint64_t lag_target = 0
        cdef uint64_t slot_free = 0  # every rank completed what slot t held (t - slots): a count
        cdef uint64_t target
        cdef uint64_t oldest
        cdef int rc = OK
        if t > <uint64_t>self.lag:
            lag_target = t - self.lag
        if t + 1 > self.slots:
            slot_free = t + 1 - self.slots
        target = slot_free if blocking else max(lag_target, slot_free)
        # Every rank's `completed` line is written by its rank on each
        # complete, so reading them costs a cache miss per rank.  The bound
        # is usually known to hold already (from the last reading, counters
        # only grow, or from our own completes: see _finish), and the lines
        # are read again only when it is not.
        if target > self.known_completed:
            self._await(COMPLETED, target, timeout_ns, deadline_ns, "post", t)
            self.known_completed = self._min_completed()
        self._free_completed(self.known_completed)
        while not self._fit(nbytes, start):
            oldest = self.fl_iter[self.fl_first]
            if oldest >= self.next_complete:
                raise ArenaFullError(
                    f"{self._call_name('post', t)}: a record of {nbytes} bytes does not fit in the arena "
                    f"({self.arena_bytes} bytes) next to the {self.fl_count} "
                    f"record{'' if self.fl_count == 1 else 's'} still in flight; "
                    f"use arena_bytes of at least (lag + 2) x the largest record "
                    f"(its blocks, each rounded up to 64 bytes)")
            self._await(COMPLETED, oldest + 1, timeout_ns, deadline_ns, "post", t)
            self.known_completed = self._min_completed()
            self._free_completed(self.known_completed)
        self.pending = True
        self.last_streamed = False  # until _scatter streams
        self.pending_start = start[0]
        self.pending_bytes = nbytes
        return 0

    @cython.final
    cdef inline int _check_fits(self, uint64_t itemsize) except -1:
        """ArenaFullError if the blocks just parsed fit neither the arena nor the mailboxes."""
        if self.unfit_block >= 0:  # rare: a C call only then
            self._refuse_unfit(itemsize)
        return 0

    cdef int _refuse_unfit(self, uint64_t itemsize) except -1:
        cdef int q = self.unfit_block
        if not self._fits_mailboxes(itemsize):
            raise ArenaFullError(
                f"send_counts[{q}] = {self.counts[q]} elements of {itemsize} bytes do not fit in the arena "
                f"({self.arena_bytes} bytes per rank) after the blocks before them; "
                f"create the communicator with a larger arena_bytes")
        return 0

    cdef int _reserve_blocks(self, uint64_t t, uint64_t nbytes, uint64_t itemsize,
                             int64_t timeout_ns, int64_t* deadline_ns, bint blocking=False) except -1:
        """``_reserve`` for the blocks just parsed: mailboxes if they all fit, else a record."""
        cdef uint64_t start
        cdef bint inline = self._fits_mailboxes(itemsize)  # the caller ran _check_fits
        self._reserve(t, 0 if inline else nbytes, timeout_ns, deadline_ns, &start, blocking)
        self.pending_inline = inline
        return 0

    # Slot numbers without a 64-bit division where one is easily avoided
    # (power-of-two slot counts, ring steps, one slot for all senders in a poll).
    cdef inline uint64_t _slot(self, uint64_t t) noexcept nogil:
        """The descriptor slot of iteration ``t``: ``t mod slots`` (see ``_slot_count``).

        A mask when ``slots`` is a power of two: a 64-bit division takes
        tens of cycles, and a call asks for slots several times.
        """
        return t & self.slot_mask if self.slot_mask != 0 else t % self.slots

    cdef inline int _next_index(self, int i) noexcept nogil:
        """``(i + 1) mod slots``, for rings of ``slots`` entries."""
        return 0 if <uint64_t>i + 1 == self.slots else i + 1

    cdef inline bls_desc_t* _desc_in_slot(self, int sender, uint64_t slot) noexcept nogil:
        return <bls_desc_t*>(self.descs + (<uint64_t>sender * self.slots + slot) * self.desc_stride)

    cdef inline bls_mbox_t* _mbox(self, int sender, int receiver, uint64_t slot) noexcept nogil:
        return self.mboxes + (<uint64_t>sender * self.size + receiver) * self.slots + slot

    cdef inline bls_mbox_t* _offer_mbox(self, int q) noexcept nogil:
        """The mailbox of this rank's offer to ``q`` (of iteration ``offered_t``)."""
        return self._mbox(self.rank, q, self._slot(self.offered_t))

    cdef inline bint _fits_mailboxes(self, uint64_t itemsize) noexcept nogil:
        """Whether every block just parsed fits its mailbox (then no record is needed)."""
        cdef int q
        if self.mboxes == NULL:
            return False
        for q in range(self.size):
            if <uint64_t>self.counts[q] * itemsize > BLS_MBOX_DATA:
                return False
        return True

    cdef inline char* _block_dst(self, int q, uint64_t t) noexcept nogil:
        """Where the pending post of ``t`` puts its block for rank ``q``."""
        if self.pending_inline:
            return self._mbox(self.rank, q, self._slot(t)).data
        return self.arenas + <uint64_t>self.rank * self.arena_bytes + self.pending_start + self.block_off[q]

    cdef int _commit(self, uint64_t t, cnp.dtype dtype) except -1:
        """Write the mailboxes (or the descriptor) of the pending post and publish iteration ``t``."""
        cdef uint64_t slot = self._slot(t)
        cdef bls_desc_t* d
        cdef bls_mbox_t* mb
        cdef int q
        cdef int idx
        cdef uint64_t itemsize = dtype.itemsize
        cdef bytes dstr = self._dtype_str(dtype)
        self._check_not_closed_during("post", t)  # or peers would read a closed rank's post
        if not self.pending_inline and self.mboxes == NULL:
            d = self._desc_in_slot(self.rank, slot)
            d.record_offset = self.pending_start
            d.record_bytes = self.pending_bytes
            d.itemsize = <uint32_t>itemsize
            _put_dtype(d.dtype, dstr)
            for q in range(self.size):
                d.blocks[2 * q] = self.block_off[q]
                d.blocks[2 * q + 1] = <uint64_t>self.counts[q] * itemsize
            # Release: the record and the descriptor above are visible to any
            # receiver whose acquire load sees the stamp.
            bls_store_release(&d.stamp, t + 1)
        if self.mboxes != NULL:
            for q in range(self.size):
                mb = self._mbox(self.rank, q, slot)
                mb.nbytes = <uint64_t>self.counts[q] * itemsize
                mb.inline_data = self.pending_inline
                if not self.pending_inline:
                    mb.block_offset = self.pending_start + self.block_off[q]
                    if self.offers_pending and self.offered[q] != NULL:  # (a zero-copy post has none)
                        mb.direct_addr = <uint64_t><uintptr_t>self.offered[q]
                        mb.direct_state = BLS_DIRECT_OFFERED
                    else:
                        mb.direct_state = BLS_DIRECT_NONE
                mb.itemsize = <uint32_t>itemsize
                _put_dtype(mb.dtype, dstr)
                # Release: the block (inline, or in the record) is visible
                # to the receiver whose acquire load sees this.
                bls_store_release(&mb.stamp, t + 1)
        # `published` carries the same news for sleepers, liveness checks and tools.
        idx = <int>self._slot(<uint64_t>(self.fl_first + self.fl_count))
        self.fl_iter[idx] = t
        self.fl_start[idx] = self.pending_start
        self.fl_end[idx] = self.pending_start + self.pending_bytes
        self.fl_count += 1
        self.arena_head = self.pending_start + self.pending_bytes
        self.slot_dtype[self._slot(t)] = dtype
        self.pending = False
        for q in range(self.size):
            self.bytes_sent += <uint64_t>self.counts[q] * itemsize
        cdef bls_rank_t* me = &self.ranks[self.rank]
        self._announce(&me.published, &me.published_sleepers, t + 1)
        self.next_post = t + 1
        return 0

    cdef inline bytes _dtype_str(self, cnp.dtype dtype):
        """The descriptor string of a validated dtype (cached: the hot path sends one dtype)."""
        if dtype is not self.last_dtype:
            self._check_dtype(dtype)
            self.last_dtype_str = dtype.str.encode()
            self.last_dtype = dtype
        return self.last_dtype_str

    cdef object _check_dtype(self, cnp.dtype dtype):
        if dtype.kind == "T":  # numpy's StringDType: hasobject too, though it holds no objects
            raise BlsTypeError(f"dtype {dtype} holds strings of varying width; only fixed-size data "
                               f"can be sent (a fixed-width 'U' or 'S' dtype can)")
        if dtype.hasobject:
            raise BlsTypeError(f"dtype {dtype} holds Python objects; only fixed-size data can be sent")
        if dtype.itemsize == 0:
            raise BlsTypeError(f"dtype {dtype} has no size")
        if len(dtype.str) >= BLS_DTYPE_CHARS:
            raise BlsTypeError(f"dtype {dtype} is not supported")
        # Receivers rebuild the dtype from dtype.str: structured and subarray
        # dtypes would lose their fields and shape on the way (both are "|V8").
        if np.dtype(dtype.str) != dtype:
            raise BlsTypeError(
                f"dtype {dtype} would arrive as {dtype.str}, without its fields or shape: send "
                f"arr.view(np.uint8) and view what arrives as the dtype again")
        return dtype

    cdef object _resolve_dtype(self, object dtype):
        """The numpy dtype of a zero-copy dtype argument, checked and remembered (callers repeat theirs)."""
        if dtype is not self.last_dtype_arg or self.last_dtype_arg is None:
            self.last_dtype_arg_resolved = self._check_dtype(_as_numpy_dtype(dtype))
            self.last_dtype_arg = dtype
        return self.last_dtype_arg_resolved

    cdef int _check_post_order(self, int64_t t) except -1:
        """Refuse a post of ``t`` out of order or on a closed or aborted communicator.

        The caller checks its input next, and only then _check_peers_for_post:
        bad input is named as such even when a peer has left.
        """
        self._check_open()
        if t < 0 or <uint64_t>t != self.next_post:
            raise BlsValueError(f"{self._call_name('post', t)} called, but the next iteration to post "
                                f"is {self.next_post}")
        # This rank's own part of the lag bound (I2): no peer could ever lift it.
        if <uint64_t>t > <uint64_t>self.lag and <uint64_t>t - self.lag > self.next_complete:
            raise BlsValueError(
                f"{self._call_name('post', t)} needs this rank to have completed iteration {t - self.lag - 1} first "
                f"(lag {self.lag}); it has completed {self.next_complete} iterations")
        return 0

    cdef int _check_peers_for_post(self, uint64_t t) except -1:
        """PeerLostError if a peer that has not posted ``t`` closed, or (looked for once per slice) died.

        Such a peer never posts ``t``, so this iteration can never complete;
        without this a post that need not wait (lag > 0) went on publishing
        into a communicator whose peer had gone.  A peer gone after posting
        ``t`` is no reason to fail: ``t`` still completes here.
        """
        cdef bint poll_pids = False
        cdef int64_t now
        # Acquire: the states _check_alive reads are read after the count
        # (a closing rank stores CLOSED, then increments it).  Its line is the
        # abort word's, which _check_open has just read.
        cdef uint32_t closes = bls_load_acquire32(&self.abort_line.closes)
        if closes == self.closes_at_post:
            now = bls_coarse_now_ns()
            if now < self.next_post_liveness_ns:
                return 0
            self.next_post_liveness_ns = now + self.slice_ns
            poll_pids = True
        self.closes_at_post = closes
        if self._check_alive(PUBLISHED, t + 1, 0, poll_pids) != OK:
            self._raise_aborted()
        return 0

    cdef inline void _scatter(self, uint64_t t, const char* src, uint64_t itemsize, bint defer_own,
                              bint offer) noexcept nogil:
        """Copy the blocks of a contiguous send buffer into their places (mailboxes or record).

        Blocks for other ranks are copied the way ``_copy_strategy`` picks,
        and timed when it chose.  With ``defer_own`` the block for this rank
        is not copied: the caller (a blocking alltoallv, which holds ``send``
        until it returns) copies it straight to its destination in
        ``_gather``, one copy instead of two.  With ``offer`` (the same
        caller) blocks of at least ``direct_min_bytes`` are not copied
        either: they are offered for a direct read (``offered``), and
        ``_withdraw_offers`` copies those nobody read before the call returns.
        """
        cdef int q
        cdef uint64_t n
        cdef uint64_t peer_bytes = 0
        cdef const char* own = src
        cdef const char* p = src
        offer = offer and not self.pending_inline and self.direct_min != 0
        for q in range(self.size):
            n = <uint64_t>self.counts[q] * itemsize
            self.offered[q] = NULL
            if q == self.rank:
                own = p
            elif offer and n >= self.direct_min and self.direct_peer[q]:
                self.offered[q] = p
                self.offers_pending = True
                self.offered_t = t
            else:
                peer_bytes += n
            p += n
        cdef int strategy = COPY_CACHED
        cdef bint timed = False
        if not self.pending_inline:  # mailbox lines also carry their stamp: never streamed
            if self.copy_mode != COPY_AUTO:
                strategy = self.copy_mode
            elif peer_bytes >= STREAM_MIN_BYTES:
                strategy, timed = self._copy_strategy(), True
        cdef int64_t start = bls_now_ns() if timed else 0
        if not self.pending_inline and peer_bytes < STREAM_MIN_BYTES and strategy == COPY_CACHED:
            for q in range(self.size):  # a mailbox line took no less with it
                if q != self.rank and self.offered[q] == NULL:
                    bls_prefetch_for_write(self._block_dst(q, t), <uint64_t>self.counts[q] * itemsize)
        if strategy == COPY_STREAM:
            bls_stream_begin()
            self.last_streamed = True
        p = src
        for q in range(self.size):
            n = <uint64_t>self.counts[q] * itemsize
            if q != self.rank and self.offered[q] == NULL:
                if strategy == COPY_STREAM and not (n <= SHARED_CACHE_MAX_BYTES and self._shares_our_cpu(q)):
                    bls_stream_copy(self._block_dst(q, t), p, n)
                    self.bytes_streamed += n
                else:
                    memcpy(self._block_dst(q, t), p, n)
            p += n
        if strategy == COPY_STREAM:
            bls_stream_end()
        if timed:
            self._note_copy_cost(strategy, bls_now_ns() - start, peer_bytes)
        n = <uint64_t>self.counts[self.rank] * itemsize
        if defer_own:
            self.own_src, self.own_bytes = own, n
            self.own_rec = self._block_dst(self.rank, t)
        else:
            memcpy(self._block_dst(self.rank, t), own, n)

    cdef inline bint _shares_our_cpu(self, int q) noexcept nogil:
        """Whether rank ``q`` last waited on the CPU this rank last waited on.

        Such a receiver reads our block from the caches of the core we share,
        where ordinary stores leave it; streaming stores would send it to
        memory and back.  4 ranks on 2 cores, "stream" (median over 5 rounds
        of 1000 iterations' median, alternating): 16 KiB per pair took 35.5
        us against 38.0 streaming to every receiver, 4 KiB 16.7 against 17.3.
        """
        # Relaxed: CPUs are hints (see _publish_cpu); a stale one costs speed only.
        return self.cpu_hint != 0 and bls_load_relaxed32(&self.ranks[q].cpu_hint) == self.cpu_hint

    cdef inline double _copy_estimate(self, int strategy) noexcept nogil:
        """The least of ``strategy``'s recent costs (ns per byte), or 0 if it has none."""
        cdef double best = 0
        cdef int i
        for i in range(COPY_SAMPLES):
            if self.copy_cost[strategy * COPY_SAMPLES + i] > 0 and (
                    best == 0 or self.copy_cost[strategy * COPY_SAMPLES + i] < best):
                best = self.copy_cost[strategy * COPY_SAMPLES + i]
        return best

    cdef int _copy_strategy(self) noexcept nogil:
        """How this post copies its blocks for other ranks: COPY_CACHED or COPY_STREAM.

        Which is faster depends on where the host placed the cores, and that
        changes while a job runs: sharing a cache, cached stores are faster
        (the receiver then reads the lines from that cache); sharing none,
        each cached store must first fetch the line from the receiver's
        cache, and streaming was 3-5x faster.  So in "auto" each strategy's
        cost is measured on real posts, the cheaper one is used, and one post
        in COPY_EXPLORE_EVERY tries the other.
        """
        if not BLS_HAVE_STREAM:
            return COPY_CACHED
        cdef double cached = self._copy_estimate(COPY_CACHED)
        cdef double stream = self._copy_estimate(COPY_STREAM)
        if cached == 0:
            return COPY_CACHED
        if stream == 0:
            return COPY_STREAM
        cdef int best = COPY_STREAM if stream <= STREAM_MARGIN * cached else COPY_CACHED
        self.copy_choices += 1
        if self.copy_choices % COPY_EXPLORE_EVERY == 0:
            return COPY_STREAM if best == COPY_CACHED else COPY_CACHED
        return best

    cdef inline void _note_copy_cost(self, int strategy, int64_t ns, uint64_t nbytes) noexcept nogil:
        self.copy_cost[strategy * COPY_SAMPLES + self.copy_next[strategy]] = (
            <double>(ns if ns > 0 else 1) / <double>nbytes)
        self.copy_next[strategy] = (self.copy_next[strategy] + 1) % COPY_SAMPLES

    def _copy_estimates(self):
        """``(cached, stream)``: what "auto" estimates each costs, ns per byte (0: not measured yet)."""
        return self._copy_estimate(COPY_CACHED), self._copy_estimate(COPY_STREAM)

    def _set_copy_estimates(self, double cached, double stream):
        """Replace every sample "auto" measured with these costs (0: none), for tests.

        The next post chooses from them, without a clock.
        """
        cdef int i
        for i in range(COPY_SAMPLES):
            self.copy_cost[COPY_CACHED * COPY_SAMPLES + i] = cached
            self.copy_cost[COPY_STREAM * COPY_SAMPLES + i] = stream

    cdef inline object _timeout_arg(self, object timeout):
        """A call's ``timeout`` argument, the communicator's default when not given."""
        return self.default_timeout if timeout is DEFAULT_TIMEOUT else timeout

    @property
    def timeout(self):
        """The default timeout of every wait, in seconds; ``None`` blocks.

        A wait that times out raises ``BlsTimeoutError`` and leaves the
        communicator usable.  Checked when set, not at the next wait.
        """
        return self.default_timeout

    @timeout.setter
    def timeout(self, value):
        self._timeout_ns(value)  # raises BlsTypeError / BlsValueError naming the value
        self.default_timeout = value

    @property
    def direct_min_bytes(self):
        """How large a block (bytes) a blocking :meth:`alltoallv` offers for a direct read; 0: never.

        Settable, to a whole number of bytes: 32 KiB by default, below which
        the system call costs more than the copy it saves.
        """
        return self.direct_min

    @direct_min_bytes.setter
    def direct_min_bytes(self, value):
        if _is_bool(value) or not hasattr(type(value), "__index__"):  # 1.5 or True is a mistake
            raise BlsTypeError(f"direct_min_bytes must be a whole number of bytes, got {value!r}")
        value = operator.index(value)
        if value < 0:
            raise BlsValueError(f"direct_min_bytes must be >= 0 (0 turns direct reads off), got {value}")
        self.direct_min = min(value, 0xFFFF_FFFF_FFFF_FFFF)  # more than any block: never

    @property
    def copy_policy(self):
        """How posts copy blocks for other ranks into shared memory: ``"auto"`` (default),
        ``"cached"`` (ordinary stores) or ``"stream"`` (non-temporal stores, except
        for blocks of up to 16 KiB to a rank last seen on this rank's CPU, which
        reads them from its caches).

        ``"auto"`` measures both on posts with at least 16 KiB for other
        ranks and uses the faster (see ``_copy.h``); the two differ only in
        speed.  Setting it forgets what was measured.
        """
        for name, mode in COPY_POLICIES.items():
            if mode == self.copy_mode:
                return name

    @copy_policy.setter
    def copy_policy(self, value):
        if not isinstance(value, str):
            raise BlsTypeError(f"copy_policy must be a str, one of {sorted(COPY_POLICIES)}, "
                               f"got {type(value).__name__}")
        if value not in COPY_POLICIES:
            raise BlsValueError(f"copy_policy must be one of {sorted(COPY_POLICIES)}, got {value!r}")
        self.copy_mode = COPY_POLICIES[value]
        memset(self.copy_cost, 0, sizeof(self.copy_cost))
        self.copy_choices = 0

    cdef int _gather(self, char* dst, uint64_t t, int64_t deadline_ns) noexcept nogil:
        """Copy this rank's block of every source of ``t``, in rank order, to ``dst``.

        In four passes: blocks offered for a direct read that their senders
        have not withdrawn yet are claimed and read first; then the others
        are copied from records and mailboxes; then this rank's own offers
        (if this is a blocking alltoallv) are withdrawn, after yielding the
        CPU once to a receiver sharing it that has not claimed its offer
        yet (``_give_way_to_readers``); last, the offered
        blocks not read directly are copied from their records once their
        senders filled them.  Every rank withdraws before it waits for a
        fill, and a withdrawal waits only for reads under way: so no two
        ranks wait for each other.  OK, or the error of a hand-over wait
        (``late_rank`` names the peer).
        """
        cdef int s
        cdef int rc
        cdef char* d = dst
        cdef bls_mbox_t* mb
        cdef uint64_t slot = self._slot(t)
        cdef bint offered_to_us = False
        self.read_direct = False
        for s in range(self.size):
            if self.recv_direct[s] == FROM_FILL:
                offered_to_us = True
                mb = self._mbox(s, self.rank, slot)
                # Acq_rel CAS: only one of us and the sender moves the block
                # on from OFFERED; winning it, we read before the sender may
                # return (it waits while we are CLAIMED).
                if bls_cas32(&mb.direct_state, BLS_DIRECT_OFFERED, BLS_DIRECT_CLAIMED):
                    if s < 64 and direct_claims_stall >> s & 1:
                        self._stall_claim(mb)
                    if not (s < 64 and direct_reads_fail >> s & 1) and bls_read_peer(
                            self.ranks[s].pid, d, mb.direct_addr, self.recv_bytes[s]) == 0:
                        # Checked while still CLAIMED: until DONE the sender
                        # cannot have left its call in the ordinary way.
                        rc = self._check_read_whole(s)
                        if rc != OK:
                            self.late_rank = s
                            return rc
                        # Release: our reads of the sender's buffer happen
                        # before it sees DONE and returns to change it.
                        if not bls_cas32(&mb.direct_state, BLS_DIRECT_CLAIMED, BLS_DIRECT_DONE):
                            self.late_rank = s
                            return ERR_ABORTED  # it abandoned our claim, after aborting
                        self.read_direct = True
                        self.recv_direct[s] = READ_DIRECT
                        self.bytes_read_direct += self.recv_bytes[s]
                    elif not bls_cas32(&mb.direct_state, BLS_DIRECT_CLAIMED, BLS_DIRECT_REFUSED):
                        self.late_rank = s
                        return ERR_ABORTED  # abandoned, as above
                    # REFUSED: the sender fills its record when it sees it
            d += self.recv_bytes[s]
        # The own block stays in own_src until _complete succeeds: if this
        # fails, _place_deferred_own puts it in the record for a retry.
        d = dst
        for s in range(self.size):
            if s == self.rank and self.own_src != NULL:
                memcpy(d, self.own_src, self.recv_bytes[s])
            elif self.recv_direct[s] == FROM_RECORD:
                memcpy(d, self.base + self.recv_off[s], self.recv_bytes[s])
            d += self.recv_bytes[s]
        if self.offers_pending and self.offered_t == t:
            rc = self._withdraw_offers(self._grace(deadline_ns))
            if rc != OK:
                return rc
        if not offered_to_us:
            return OK
        # Blocks read directly cannot be read again: a failed wait from
        # here on aborts, so it gets the grace; otherwise it is retryable.
        if self.read_direct:
            deadline_ns = self._grace(deadline_ns)
        d = dst
        for s in range(self.size):
            if self.recv_direct[s] == FROM_FILL:
                mb = self._mbox(s, self.rank, slot)
                rc = self._await_handoff(mb, True, s, deadline_ns)
                if rc != OK:
                    self.late_rank = s
                    return rc
                memcpy(d, self.base + self.recv_off[s], self.recv_bytes[s])
            d += self.recv_bytes[s]
        return OK

    cdef void _stall_claim(self, bls_mbox_t* mb) noexcept nogil:
        """Tests: hold a claim (see _stall_direct_claims) while the sender leaves it CLAIMED."""
        cdef uint32_t ms = 0
        bls_store_release32(&direct_claims_stalled, direct_claims_stalled + 1)
        while (ms < bls_load_relaxed32(&direct_claims_stall_ms)
               and bls_load_acquire32(&mb.direct_state) == BLS_DIRECT_CLAIMED):
            usleep(1000)
            ms += 1

    cdef inline int64_t _grace(self, int64_t deadline_ns) noexcept nogil:
        """``deadline_ns`` (-1: none), pushed to at least HANDOFF_GRACE_NS from now."""
        if deadline_ns < 0:
            return -1
        return max(deadline_ns, bls_now_ns() + HANDOFF_GRACE_NS)

    cdef inline int _check_read_whole(self, int s) noexcept nogil:
        """After a direct read from ``s``, still CLAIMED: OK, unless ``s`` may have changed its buffer under it.

        A sender waits while we are CLAIMED; it leaves without doing so only
        when closed by a signal handler during the call, and its CLOSED state
        is stored before it returns to change its buffer: had our read seen
        such a change, the full fence makes this load see the state.  A
        process that died (or exec'd, its pid reused) is no longer the one
        whose buffer was offered: its pidfd says so.
        """
        bls_fence()
        cdef bint closed = bls_load_acquire32(&self.ranks[s].state) == BLS_STATE_CLOSED
        if closed or self._exited(s):
            self.lost_rank = s
            self._abort_nogil(BLS_ABORT_PEER_LOST, s,
                              b"it closed the communicator while others read its send buffer" if closed
                              else b"its process exited while others read its send buffer")
            return ERR_LOST
        return OK

    cdef int _withdraw_offers(self, int64_t deadline_ns) noexcept nogil:
        """Take back this rank's offers: copy to the record each block nobody read directly.

        A block being read (CLAIMED) is waited for.  Once this returns OK
        every offer is DONE or FILLED, and ``send`` may change.  First
        gives a receiver sharing our CPU a chance to read directly.
        """
        cdef int q
        cdef int rc
        self._give_way_to_readers()
        for q in range(self.size):
            if self.offered[q] == NULL:
                continue
            while self._take_back(q) == BLS_DIRECT_CLAIMED:
                rc = self._await_handoff(self._offer_mbox(q), False, q, deadline_ns)
                if rc != OK:  # the offers from q on stay: the caller aborts, then _abandon_offers
                    self.late_rank = q
                    return rc
        self.offers_pending = False
        return OK

    cdef void _give_way_to_readers(self) noexcept nogil:
        """Yield the CPU once if a receiver of an unclaimed offer last waited on it.

        With ranks sharing cores, such a receiver is often runnable but not
        running when we withdraw: the block would then cross twice (our copy
        to the record, its copy out).  Giving way first lets it read the
        block directly; if it does not, the withdrawal goes on as before.
        A yield may cost us up to a scheduler slice (a few ms) when the CPU
        goes to something that does not claim the offer, so after
        GIVE_WAY_MISSES such yields in a row we skip GIVE_WAY_SKIPS.
        """
        if self.give_way_skips > 0:
            self.give_way_skips -= 1
            return
        cdef int q
        cdef bls_mbox_t* mb
        for q in range(self.size):
            if self.offered[q] == NULL or not self._shares_our_cpu(q):
                continue
            mb = self._offer_mbox(q)
            # Relaxed: a stale state or CPU hint costs one yield or one
            # record copy, never a wrong byte (_take_back's CAS decides).
            if bls_load_relaxed32(&mb.direct_state) != BLS_DIRECT_OFFERED:
                continue
            bls_yield()
            if bls_load_relaxed32(&mb.direct_state) != BLS_DIRECT_OFFERED:
                self.give_way_misses = 0
            else:
                self.give_way_misses += 1
                if self.give_way_misses >= GIVE_WAY_MISSES:
                    self.give_way_misses = 0
                    self.give_way_skips = GIVE_WAY_SKIPS
            return

    cdef uint32_t _take_back(self, int q) noexcept nogil:
        """Withdraw the offer to ``q`` unless it is being read: the state it was in.

        Copies the block to the record unless the receiver read it (DONE)
        or reads it now (CLAIMED: then the offer stays, for the caller to
        wait on); clears ``offered[q]`` otherwise.
        """
        cdef bls_mbox_t* mb = self._offer_mbox(q)
        cdef uint32_t state
        # Acq_rel CAS, as the receiver's: whoever wins moves the block.
        if bls_cas32(&mb.direct_state, BLS_DIRECT_OFFERED, BLS_DIRECT_WITHDRAWN):
            state = BLS_DIRECT_WITHDRAWN
        else:
            state = bls_load_acquire32(&mb.direct_state)
        if state == BLS_DIRECT_CLAIMED:
            return state
        if state != BLS_DIRECT_DONE:  # WITHDRAWN, REFUSED or WANTED: it reads the record
            if state == BLS_DIRECT_REFUSED:
                self.direct_peer[q] = False  # it could not read us (ptrace rules?): offer no more
            memcpy(self.arenas + <uint64_t>self.rank * self.arena_bytes + mb.block_offset,
                   self.offered[q], mb.nbytes)
            # Release: the block is in the record for the receiver whose
            # acquire load sees FILLED.
            bls_store_release32(&mb.direct_state, BLS_DIRECT_FILLED)
        self.offered[q] = NULL
        return state

    cdef void _abandon_offers(self) noexcept nogil:
        """After this rank aborted: take back every offer without waiting.

        Reads under way are abandoned (their readers' CAS to DONE fails, and
        they raise: see _layout.h), every other offer is filled as usual.
        """
        cdef int q
        cdef bls_mbox_t* mb
        for q in range(self.size):
            mb = self._offer_mbox(q)
            while self.offered[q] != NULL and self._take_back(q) == BLS_DIRECT_CLAIMED:
                # Fails only if the read just ended (DONE or REFUSED): then
                # _take_back again handles that state.
                if bls_cas32(&mb.direct_state, BLS_DIRECT_CLAIMED, BLS_DIRECT_ABANDONED):
                    self.offered[q] = NULL
        self.offers_pending = False

    cdef int _await_handoff(self, bls_mbox_t* mb, bint until_filled, int r, int64_t deadline_ns) noexcept nogil:
        """Wait for peer ``r``'s side of a direct-read hand-over (see BLS_DIRECT_* in _layout.h).

        A sender waits while its receiver ``r`` reads (CLAIMED); a receiver
        waits until its sender ``r`` filled its record (FILLED).  Either is
        a copy under way or about to be (a sender fills every offer before
        it returns, aborted or not), so this spins and yields (as
        ``_wait``), then naps, with no futex.  An abort (another rank's:
        this rank's own wait fails first) ends either wait only after
        HANDOFF_GRACE_NS more: the read or the fill is under way, and once
        it is done the iteration completes on both sides (a sender that
        gives up abandons the read: see _fail_handoff).  Every
        HANDOFF_CHECK_NS it checks whether ``r`` lives, the
        deadline (-1: none) and signals.  OK or an ERR_* code.
        """
        cdef uint32_t state
        cdef int64_t start = bls_now_ns()
        cdef int64_t now
        cdef int64_t next_check = start + HANDOFF_CHECK_NS
        cdef int64_t abort_seen = -1
        cdef int signalled
        while True:
            state = bls_load_acquire32(&mb.direct_state)
            if (state == BLS_DIRECT_FILLED) if until_filled else (state != BLS_DIRECT_CLAIMED):
                return OK
            if until_filled and (state == BLS_DIRECT_DONE or state == BLS_DIRECT_ABANDONED):
                return ERR_ABORTED  # read by an earlier call of ours, which aborted: no fill comes
            now = bls_now_ns()
            if abort_seen < 0 and self._aborted():
                abort_seen = now
            # A read or fill under way ends soon: given the grace, the
            # iteration completes on both sides, as Comm.abort promises.
            if abort_seen >= 0 and now - abort_seen >= HANDOFF_GRACE_NS:
                return ERR_ABORTED
            if now >= next_check:
                next_check = now + HANDOFF_CHECK_NS
                if bls_load_acquire32(&self.ranks[r].state) == BLS_STATE_CLOSED or self._exited(r):
                    state = bls_load_acquire32(&mb.direct_state)  # it may have finished first
                    if (state == BLS_DIRECT_FILLED) if until_filled else (state != BLS_DIRECT_CLAIMED):
                        return OK
                    self.lost_rank = r
                    self._abort_nogil(BLS_ABORT_PEER_LOST, r,
                                      b"it left while copying a block for a direct read")
                    return ERR_LOST
                if deadline_ns >= 0 and now >= deadline_ns:
                    return ERR_TIMEOUT
                with gil:
                    signalled = check_signals()
                if signalled != 0:
                    return ERR_SIGNAL
                if self.closed:
                    return ERR_CLOSED
            if now - start < self.pause_ns:
                bls_cpu_relax()
            elif now - start < self.spin_ns:
                bls_yield()
            else:
                usleep(HANDOFF_NAP_US)

    cdef int _fail_handoff(self, int rc, str operation, uint64_t t) except -1:
        """Raise for a hand-over wait that failed (``late_rank``: the peer).

        If this rank still has offers out (its wait for a read under way
        failed), or read a block directly that a retry could not read
        again, the call cannot be retried: it aborts the communicator first
        (and abandons its offers).  Otherwise (a receiver that waited for a
        sender to fill its record) ``t`` stays posted and ``complete(t)``
        may be retried.
        """
        cdef int r = self.late_rank
        cdef bint fatal = self.offers_pending or self.read_direct
        what = "timed out" if rc == ERR_TIMEOUT else "interrupted"
        # Closed: the peers see our CLOSED state instead (and our mapping may be going).
        if fatal and rc != ERR_ABORTED and rc != ERR_LOST and not self.closed:
            data = _reason_bytes(f"left {self._call_name(operation, t)} during a direct copy with rank {r} ({what})")
            self._abort_nogil(BLS_ABORT_USER, -1, data)
        if self.offers_pending and not self.closed:
            with nogil:
                self._abandon_offers()  # after the abort: see _layout.h
        if rc == ERR_SIGNAL:
            return -1  # the handler's exception (KeyboardInterrupt) is set: let it propagate
        if rc == ERR_CLOSED:
            self._check_not_closed_during(operation, t)
        if rc == ERR_ABORTED and not self._aborted():
            self._protocol_error(f"rank {r}'s block for iteration {t} was taken by an earlier call")
        if rc == ERR_TIMEOUT:
            if fatal:
                raise BlsTimeoutError(
                    f"{self._call_name(operation, t)} timed out waiting for rank {r} to finish a direct copy of "
                    f"iteration {t}; the communicator is aborted (the iteration cannot be retried)",
                    operation=operation, iteration=t, waiting_for=[r])
            raise BlsTimeoutError(
                f"{self._call_name(operation, t)} timed out waiting for rank {r} to copy its block of iteration {t} "
                f"to its record", operation=operation, iteration=t, waiting_for=[r])
        self._raise_aborted()
        return -1

    cdef inline int64_t _deadline_of(self, object timeout, int64_t* deadline_ns) except? -3:
        """The call's deadline (``_await``'s), fixed now if no wait fixed it yet."""
        cdef int64_t timeout_ns
        if deadline_ns[0] == NO_DEADLINE_YET:
            timeout_ns = self._timeout_ns(timeout)
            deadline_ns[0] = -1 if timeout_ns < 0 else bls_now_ns() + timeout_ns
        return deadline_ns[0]

    cdef int _take_back_offers(self, uint64_t t, object timeout) except -1:
        """``_withdraw_offers`` for a blocking alltoallv whose complete did not get that far.

        Its own deadline, at least HANDOFF_GRACE_NS: the call's may have
        passed (the complete timed out), and the reads it waits for are
        already under way.
        """
        if self.closed:  # peers see our CLOSED state (see _check_read_whole)
            return 0
        cdef int64_t deadline = NO_DEADLINE_YET
        self._deadline_of(timeout, &deadline)
        cdef int rc
        self.read_direct = False
        with nogil:
            rc = self._withdraw_offers(self._grace(deadline))
        if rc != OK:
            self._fail_handoff(rc, "alltoallv", t)
        return 0

    cdef inline void _place_deferred_own(self) noexcept nogil:
        """Put a deferred own block into the record, where a later ``complete`` reads it."""
        if self.own_src != NULL and not self.closed:
            memcpy(self.own_rec, self.own_src, self.own_bytes)
        self.own_src = NULL  # closed: the record is gone, and nobody will read it

    cdef int _post(self, int64_t t, cnp.ndarray send, object send_counts, object timeout,
                   int64_t* deadline_ns, bint defer_own=False, bint blocking=False) except -1:
        """Copy ``send`` into this rank's mailboxes or record for iteration ``t`` and publish it.

        ``*deadline_ns``: see ``_await`` (a blocking alltoallv shares one with its complete).

        ``defer_own``: see ``_scatter``; the caller must then run ``_gather``
        or ``_place_deferred_own`` before ``send`` may change.
        """
        cdef uint64_t nbytes
        self._check_send(t, send, send_counts, &nbytes)
        cdef cnp.dtype dtype = <cnp.dtype>cnp.PyArray_DESCR(send)
        cdef int64_t itemsize = dtype.itemsize
        self._check_peers_for_post(t)  # after the input checks (see _check_post_order)
        self._reserve_blocks(t, nbytes, itemsize, self._timeout_ns(timeout), deadline_ns, blocking)
        cdef char* src = <char*>cnp.PyArray_DATA(send)
        # Offers only from a blocking call that copies its own block last:
        # an out overlapping send would change send under a direct read.
        cdef bint offer = blocking and defer_own and self.mboxes != NULL
        if nbytes >= NOGIL_COPY_BYTES:
            with nogil:
                self._scatter(t, src, itemsize, defer_own, offer)
        else:
            self._scatter(t, src, itemsize, defer_own, offer)
        self._commit(t, dtype)
        return 0

    @cython.final
    cdef inline int _check_send(self, int64_t t, cnp.ndarray send, object send_counts, uint64_t* nbytes) except -1:
        """Refuse a post of ``t`` out of order, or of ``send``/``send_counts`` that do not fit.

        Touches nothing shared but the abort word, so the first call runs it
        before waiting for the peers to attach too: bad input is named at
        once, not after (or instead of) that wait.  Leaves the parsed counts
        in ``self.counts`` and the blocks' bytes in ``nbytes``.
        """
        self._check_post_order(t)
        if self.pending:
            raise BlsValueError(f"{self._call_name('post', t)} inside an open post_views({t}) block")
        if not cnp.PyArray_IS_C_CONTIGUOUS(send):
            raise BlsValueError("send must be C-contiguous (use numpy.ascontiguousarray)")
        cdef cnp.dtype dtype = <cnp.dtype>cnp.PyArray_DESCR(send)
        self._dtype_str(dtype)
        self._parse_counts(send_counts, dtype.itemsize, nbytes, cnp.PyArray_SIZE(send))
        cdef uint64_t total = 0
        cdef bint wrapped = False  # counts are int64 >= 0: a sum past 2**64 cannot match send
        cdef int q
        for q in range(self.size):
            wrapped |= total + <uint64_t>self.counts[q] < total
            total += <uint64_t>self.counts[q]
        if wrapped or total != <uint64_t>cnp.PyArray_SIZE(send):
            raise BlsValueError(
                f"send_counts add up to {sum([self.counts[q] for q in range(self.size)])} elements "
                f"but send holds {cnp.PyArray_SIZE(send)}")
        self._check_fits(dtype.itemsize)
        return 0

    cdef object _views_base(self, str operation, int64_t t):
        """What views of this call hold to keep the mapping alive (``view_base``, read once).

        Read once per call: a close during it (a finalizer at an allocation)
        drops ``view_base``, and a view without it would outlive the mapping.
        """
        self._check_not_closed_during(operation, t)
        return self.view_base

    cdef cnp.ndarray _view(self, object base, uint64_t offset, cnp.npy_intp count, cnp.dtype dtype,
                           bint writable):
        """A 1-D array of ``count`` elements at ``offset`` in the mapping (no copy), holding ``base``."""
        cdef cnp.npy_intp dims[1]
        dims[0] = count
        cdef int flags = cnp.NPY_ARRAY_C_CONTIGUOUS
        if writable:
            flags |= cnp.NPY_ARRAY_WRITEABLE
        Py_INCREF(dtype)
        cdef cnp.ndarray view = _PyArray_NewFromDescr(
            <PyTypeObject*>np.ndarray, dtype, 1, dims, NULL, self.base + offset, flags, None)
        Py_INCREF(base)
        _PyArray_SetBaseObject(view, base)
        return view

    cdef tuple _zc_reserve(self, int64_t t, object send_counts, object dtype_arg, object timeout,
                          int64_t* deadline_ns):
        """Zero-copy post, first half: wait, reserve the mailboxes or record of ``t``, return its views.

        ``views[q]`` is the writable block for rank ``q``.  ``_zc_commit(t)``
        publishes, ``_zc_cancel(t)`` forgets the reservation.
        """
        cdef uint64_t nbytes
        cdef int q
        cdef cnp.dtype dtype = self._check_views_post(t, send_counts, dtype_arg, &nbytes)
        self._check_peers_for_post(t)
        self._reserve_blocks(t, nbytes, dtype.itemsize, self._timeout_ns(timeout), deadline_ns)
        self.slot_dtype[self._slot(t)] = dtype
        try:
            base = self._views_base("post_views", t)
            views = PyTuple_New(self.size)  # filled in place: no list to build and convert
            for q in range(self.size):
                _put(views, q, self._view(base, <uint64_t>(self._block_dst(q, t) - self.base),
                                          self.counts[q], dtype, True))
            return views
        except BaseException:
            self.pending = False
            raise

    cdef cnp.dtype _check_views_post(self, int64_t t, object send_counts, object dtype_arg, uint64_t* nbytes):
        """``_check_send`` for a zero-copy post: returns the dtype; run before the first wait too."""
        self._check_post_order(t)
        if self.pending:
            raise BlsValueError(f"iteration {t} is already reserved and not yet published")
        cdef cnp.dtype dtype = self._resolve_dtype(dtype_arg)
        self._parse_counts(send_counts, dtype.itemsize, nbytes)
        self._check_fits(dtype.itemsize)
        return dtype

    cdef int _zc_commit(self, int64_t t) except -1:
        """Zero-copy post, second half: publish the record reserved for ``t``."""
        self._check_open()
        if not self.pending or t < 0 or <uint64_t>t != self.next_post:
            raise BlsValueError(f"commit({t}) without reserve({t})")
        self._commit(t, self.slot_dtype[self._slot(t)])
        self.slot_torch[self._slot(t)] = False
        return 0

    cdef void _zc_cancel(self, int64_t t):
        """Forget a reservation: nothing of iteration ``t`` was published."""
        if self.pending and t >= 0 and <uint64_t>t == self.next_post:
            self.pending = False

    # ------------------------------------------------------------ completing

    cdef int _await_posts(self, int64_t t, object timeout, int64_t* deadline_ns) except -1:
        # No abort check here: records that all arrived are read even after
        # an abort (a peer that failed right after posting t is the common
        # case); only a wait for one that cannot come raises (a post that
        # can: a block offered for a direct read by a sender that died
        # before filling it is lost with it).
        self._check_complete_order(t)
        self._await(PUBLISHED, t + 1, self._timeout_ns(timeout), deadline_ns, "complete", t)
        return 0

    cdef int _check_complete_order(self, int64_t t) except -1:
        self._check_owner()
        if self.acquired:  # completing it would let the senders overwrite what the views show
            raise BlsValueError(f"{self._call_name('complete', t)} inside an open "
                                f"complete_views({self.next_complete}) block")
        if t < 0 or <uint64_t>t != self.next_complete:
            raise BlsValueError(f"{self._call_name('complete', t)} called, but the next iteration "
                                f"to complete is {self.next_complete}")
        if <uint64_t>t >= self.next_post:
            raise BlsValueError(f"{self._call_name('complete', t)} called before post({t}) on this rank")
        return 0

    cdef cnp.ndarray _check_out(self, object out, cnp.dtype dtype):
        """``out`` as an array this rank may receive ``dtype`` into (its size is checked later)."""
        if not isinstance(out, cnp.ndarray):
            raise BlsTypeError(f"out must be a numpy array or a CPU torch tensor, got {type(out).__name__}")
        cdef cnp.ndarray recv = out
        if not cnp.PyArray_ISWRITEABLE(recv):
            raise BlsValueError("out is read-only; give a writable array")
        if not cnp.PyArray_IS_C_CONTIGUOUS(recv):
            raise BlsValueError("out must be C-contiguous: blsshm fills it in one piece, not through strides")
        if (<cnp.dtype>cnp.PyArray_DESCR(recv) is not dtype
                and not cnp.PyArray_EquivTypes(<cnp.dtype>cnp.PyArray_DESCR(recv), dtype)):
            raise BlsTypeError(f"out has dtype {recv.dtype}, the data is {dtype}")
        return recv

    cdef int _protocol_error(self, str message) except -1:
        data = message.encode("utf-8", "replace")[:BLS_REASON_CHARS - 1]
        if self._aborted():
            self._raise_aborted()  # the first reason stands, as every rank reads it
        self._abort_nogil(BLS_ABORT_PROTOCOL, -1, data)
        if self._abort_info()[0] != self.rank:
            self._raise_aborted()  # another rank aborted first (the same mismatch, seen from its side)
        raise CommAborted(f"communicator aborted by rank {self.rank}: {message}",
                          rank=self.rank, reason=message)

    cdef uint64_t _block(self, int s, uint64_t t, bytes expect_dtype, uint64_t itemsize,
                         uint64_t* nbytes, const char** dtype_chars=NULL, uint32_t* item_out=NULL) except? 0:
        """Validate what source ``s`` posted to us for ``t``; return the segment offset of our block.

        The block is in our mailbox from ``s`` or in ``s``'s record, as the
        mailbox says; without mailboxes, where ``s``'s descriptor says.
        ``dtype_chars``/``item_out``, if given, receive the sender's dtype
        string and item size.
        """
        cdef uint64_t slot = self._slot(t)
        cdef bls_mbox_t* mb
        cdef bls_desc_t* d
        cdef uint64_t off, n, where
        cdef const char* dchars = NULL
        cdef uint32_t isz = 0
        self.recv_direct[s] = FROM_RECORD
        if self.mboxes != NULL:
            mb = self._mbox(s, self.rank, slot)
            if mb.stamp != t + 1:
                self._protocol_error(f"rank {s}'s mailbox for iteration {t} holds iteration {<int64_t>mb.stamp - 1}")
            n = mb.nbytes
            dchars, isz = mb.dtype, mb.itemsize
            if mb.inline_data:
                if n > BLS_MBOX_DATA:
                    self._protocol_error(f"rank {s}'s block for iteration {t} overflows its mailbox")
                where = <uint64_t>(<char*>mb.data - self.base)
            else:
                off = mb.block_offset
                if off > self.arena_bytes or n > self.arena_bytes - off:
                    self._protocol_error(f"rank {s}'s block for iteration {t} lies outside its arena")
                where = self.hdr.arenas_offset + <uint64_t>s * self.arena_bytes + off
                # Written before the stamp we acquired; it changes later only
                # between the other BLS_DIRECT_* states, never back to NONE.
                if bls_load_acquire32(&mb.direct_state) != BLS_DIRECT_NONE:
                    self.recv_direct[s] = FROM_FILL
        else:
            d = self._desc_in_slot(s, slot)
            off = d.blocks[2 * self.rank]
            n = d.blocks[2 * self.rank + 1]
            if d.stamp != t + 1:
                self._protocol_error(f"rank {s}'s descriptor for iteration {t} holds iteration {<int64_t>d.stamp - 1}")
            if (d.record_offset > self.arena_bytes or d.record_bytes > self.arena_bytes - d.record_offset
                    or off > d.record_bytes or n > d.record_bytes - off):
                self._protocol_error(f"rank {s}'s record for iteration {t} lies outside its arena")
            dchars, isz = d.dtype, d.itemsize
            where = self.hdr.arenas_offset + <uint64_t>s * self.arena_bytes + d.record_offset + off
        if expect_dtype is not None:
            if isz != itemsize or strncmp(dchars, expect_dtype, BLS_DTYPE_CHARS) != 0:
                sent = (<bytes>dchars[:BLS_DTYPE_CHARS]).split(b'\0')[0].decode(errors="replace")
                ours = expect_dtype.decode()
                if sent == ours:  # same name, different sizes: only a corrupt line does this
                    sent, ours = f"{sent} in {isz}-byte items", f"{ours} in {itemsize}-byte items"
                self._protocol_error(
                    f"dtype mismatch at iteration {t}: rank {s} sent {sent}, rank {self.rank} sent {ours}")
        if isz == 0 or n % isz:
            self._protocol_error(f"rank {s}'s block for iteration {t} is not whole elements")
        nbytes[0] = n
        if dtype_chars != NULL:
            dtype_chars[0] = dchars
            item_out[0] = isz
        return where

    cdef int _finish(self, uint64_t t, uint64_t received) except -1:
        """Mark ``t`` completed; every rank's post of ``t`` has been seen."""
        self._check_not_closed_during("complete", t)
        self.bytes_received += received
        # Each rank posted t only after completing t - L - 1 itself (post's
        # rule): so every rank has completed t - L iterations, known without
        # reading their lines (a blocking alltoallv's next post needs no more).
        # Ordering: a rank's reads of our records happen before its release
        # store of `completed`, which comes before its release store of its
        # stamp for t; we acquired every stamp of t (_await_posts), so those
        # reads happen before whatever we overwrite after this.
        if t >= <uint64_t>self.lag and t - self.lag > self.known_completed:
            self.known_completed = t - self.lag
        cdef bls_rank_t* me = &self.ranks[self.rank]
        self._announce(&me.completed, &me.completed_sleepers, t + 1)
        self.next_complete = t + 1
        # Nothing posted or reserved ahead: the next post is likely t + 1's, like t's.
        if self.next_post == t + 1 and not self.pending:
            self._claim_next_lines(t + 1)
        return 0

    cdef inline void _claim_next_lines(self, uint64_t t) noexcept nogil:
        """Ask now (prefetchw) for the lines a post of ``t`` like the last one will write.

        Receivers on other cores read them last: at lag 0 each mailbox line
        two iterations back, and record lines as the arena ring comes round.
        Asked only when the post writes them, a stamp became visible after
        two trips between the cores: the line going to the writer, then
        back to the receiver spinning on it; record lines held up the copy
        before the stamp.  Asked at the end of the last complete, the first
        trip overlaps this rank's return, its caller and its next call.
        Only records with up to CLAIM_MAX_BYTES for other ranks: beyond, the
        requests slowed the posts.  A prefetch changes no data; a guess that proves
        wrong (other counts, a receiver still reading, no post soon) costs
        time only.
        """
        cdef uint64_t slot = self._slot(t)
        cdef uint64_t start
        cdef int q
        if self.mboxes != NULL:
            for q in range(self.size):
                if q != self.rank:
                    bls_prefetch_for_write(<char*>self._mbox(self.rank, q, slot), sizeof(bls_mbox_t))
        if self.pending_inline or self.pending_bytes == 0:
            return
        # Our own block's lines: only this rank reads them (and a blocking
        # alltoallv never writes them), so there is nothing to ask another
        # core for.  Its bounds are the last post's layout, still in
        # block_off (clamped: a post that failed its checks may have parsed
        # another one since; a wrong range costs time only).
        cdef uint64_t own_start = min(self.block_off[self.rank], self.pending_bytes)
        cdef uint64_t own_end = self.pending_bytes
        if self.rank + 1 < self.size:
            own_end = min(max(self.block_off[self.rank + 1], own_start), self.pending_bytes)
        cdef uint64_t peer_bytes = self.pending_bytes - (own_end - own_start)
        # Streaming stores do not read the lines they write: asking for them
        # would only fill this core's cache with lines about to be bypassed.
        if peer_bytes == 0 or peer_bytes > CLAIM_MAX_BYTES or self.last_streamed:
            return
        self._free_completed(self.known_completed)  # as the next _reserve does first
        if not self._fit(self.pending_bytes, &start):  # where that post's record will go
            return
        cdef char* record = self.arenas + <uint64_t>self.rank * self.arena_bytes + start
        bls_prefetch_for_write(record, own_start)
        bls_prefetch_for_write(record + own_end, self.pending_bytes - own_end)

    cdef tuple _complete(self, int64_t t, object out, object timeout, int64_t* deadline_ns):
        """Wait for every rank's post of ``t``, copy our blocks out, mark ``t`` completed."""
        self._check_complete_order(t)
        cdef cnp.dtype dtype = self.slot_dtype[self._slot(t)]  # ours: every rank's, or an abort
        cdef cnp.ndarray recv
        if out is not None:  # before waiting: a bad out is the caller's error, not a timeout
            if not isinstance(out, cnp.ndarray):
                raise BlsTypeError(f"out must be a numpy array, got {type(out).__name__}")
            recv = self._check_out(out, dtype)
        self._await_posts(t, timeout, deadline_ns)
        cdef bytes dstr = self._dtype_str(dtype)
        cdef uint64_t itemsize = dtype.itemsize
        cdef cnp.npy_intp dims[1]
        cdef uint64_t total = 0
        cdef uint64_t n
        cdef int s
        cdef bint handoffs = self.offers_pending  # waits that must not hold the GIL
        for s in range(self.size):
            self.recv_off[s] = self._block(s, t, dstr, itemsize, &n)
            self.recv_bytes[s] = n
            total += n
            handoffs |= self.recv_direct[s] == FROM_FILL
        if out is None:
            dims[0] = total // itemsize
            Py_INCREF(dtype)
            recv = _PyArray_Empty(1, dims, dtype, 0)
        else:
            if <uint64_t>cnp.PyArray_SIZE(recv) * itemsize < total:
                raise BlsValueError(
                    f"out holds {cnp.PyArray_SIZE(recv)} elements; iteration {t} delivers {total // itemsize}: "
                    f"it is posted, not completed; call complete({t}) with a larger out or none")
            if cnp.PyArray_NDIM(recv) != 1 or <uint64_t>cnp.PyArray_SIZE(recv) * itemsize != total:
                if not cnp.PyArray_CheckExact(recv):  # np.matrix stays 2-D through reshape(-1)
                    recv = recv.view(np.ndarray)
                recv = recv.reshape(-1)[:total // itemsize]
        cdef char* dst = <char*>cnp.PyArray_DATA(recv)
        # Before the gather, which consumes a deferred own block: if this
        # raised (MemoryError) after it, a retried complete(t) would read
        # that block from a record it was never copied to.
        counts = self._recv_counts(itemsize)
        cdef int64_t deadline = self._deadline_of(timeout, deadline_ns)
        cdef int rc
        if total >= NOGIL_COPY_BYTES or handoffs:
            with nogil:
                rc = self._gather(dst, t, deadline)
        else:
            rc = self._gather(dst, t, deadline)
        if rc != OK:
            self._fail_handoff(rc, "complete", t)
        self.own_src = NULL  # gathered
        self._finish(t, total)
        return self._result(recv, counts)

    cdef inline tuple _result(self, object recv, object counts):
        """``(recv, counts)``, in the tuple of the last call when nobody else holds it.

        A loop that drops each result leaves us the only reference: filling
        that tuple again saves its allocation, its freeing and the garbage
        collector's count of both, about a tenth of a small call (CPython's
        ``zip`` and ``enumerate`` recycle their result tuples the same way).
        A tuple the caller still holds is never changed.  The cost: the last
        result's arrays live on until the next call or ``close()``.
        """
        cdef tuple last = self.last_result
        if last is not None and Py_REFCNT(last) == 2:  # ours and `last`'s
            _put(last, 0, recv)
            _put(last, 1, counts)
            if not PyObject_GC_IsTracked(last):  # the collector untracks tuples of untracked items
                PyObject_GC_Track(last)
            return last
        last = (recv, counts)
        self.last_result = last
        return last

    cdef cnp.ndarray _recv_counts(self, uint64_t itemsize):
        """The element counts just received, as a read-only int64 array.

        Counts rarely change between iterations, so the last array is
        returned again while they do not (a new array would be a third of
        the cost of a small alltoallv); read-only, so sharing it is safe.
        """
        cdef cnp.ndarray counts = self.last_recv_counts
        cdef int64_t* c
        cdef int s
        cdef cnp.npy_intp dims[1]
        if counts is not None:
            c = <int64_t*>cnp.PyArray_DATA(counts)
            for s in range(self.size):
                if <uint64_t>c[s] != self.recv_bytes[s] // itemsize:
                    break
            else:
                return counts
        dims[0] = self.size
        counts = cnp.PyArray_SimpleNew(1, dims, cnp.NPY_INT64)
        c = <int64_t*>cnp.PyArray_DATA(counts)
        for s in range(self.size):
            c[s] = self.recv_bytes[s] // itemsize
        cnp.PyArray_CLEARFLAGS(counts, cnp.NPY_ARRAY_WRITEABLE)
        self.last_recv_counts = counts
        return counts

    cdef tuple _zc_acquire(self, int64_t t, object timeout, int64_t* deadline_ns):
        """Zero-copy complete, first half: wait for ``t``; read-only views of our blocks.

        ``views[s]`` is what rank ``s`` posted to this rank; ``_zc_release(t)``
        marks ``t`` completed (the senders may then overwrite the blocks).
        """
        self._await_posts(t, timeout, deadline_ns)
        base = self._views_base("complete_views", t)
        cdef uint64_t n
        cdef int s
        cdef const char* dchars
        cdef uint32_t isz
        cdef uint64_t off
        cdef uint64_t total = 0
        views = PyTuple_New(self.size)  # filled in place, as _zc_reserve's
        cdef int64_t deadline
        cdef bls_mbox_t* mb
        cdef int rc
        self.read_direct = False  # views consume nothing: a failed wait below is retryable
        for s in range(self.size):
            off = self._block(s, t, None, 0, &n, &dchars, &isz)
            if self.recv_direct[s] == FROM_FILL:  # a view needs the block in the record
                mb = self._mbox(s, self.rank, self._slot(t))
                # Fails if the sender withdrew it first (or a retry asked already).
                bls_cas32(&mb.direct_state, BLS_DIRECT_OFFERED, BLS_DIRECT_WANTED)
                deadline = self._deadline_of(timeout, deadline_ns)
                with nogil:
                    rc = self._await_handoff(mb, True, s, deadline)
                if rc != OK:
                    self.late_rank = s
                    self._fail_handoff(rc, "complete_views", t)
            if memchr(dchars, 0, BLS_DTYPE_CHARS) == NULL:
                self._protocol_error(f"rank {s}'s dtype for iteration {t} is not terminated")
            if (self.last_recv_dtype is not None
                    and strncmp(dchars, self.last_recv_dtype_str, BLS_DTYPE_CHARS) == 0):
                dtype = self.last_recv_dtype
            else:
                dstr = <bytes>dchars
                dtype = self.dtype_cache.get(dstr)
                if dtype is None:
                    try:
                        dtype = np.dtype(dstr.decode())
                    except (TypeError, ValueError, UnicodeDecodeError):
                        self._protocol_error(f"rank {s} sent an unknown dtype at iteration {t}")
                    # Checked before it is cached: a retry after the abort finds
                    # the stamps arrived and would take a cached dtype unchecked.
                    if dtype.hasobject:
                        self._protocol_error(f"rank {s} sent an object dtype at iteration {t}")
                    self.dtype_cache[dstr] = dtype
                self.last_recv_dtype, self.last_recv_dtype_str = dtype, dstr
            if (<cnp.dtype>dtype).itemsize != isz:
                self._protocol_error(f"rank {s} sent an invalid dtype at iteration {t}")
            _put(views, s, self._view(base, off, n // isz, dtype, False))
            total += n
        self.acquired_bytes = total
        self.acquired = True
        return views

    cdef int _zc_release(self, int64_t t) except -1:
        """Zero-copy complete, second half: mark ``t`` completed."""
        self._check_owner()  # as _await_posts: what was acquired is released, aborted or not
        if not self.acquired or t < 0 or <uint64_t>t != self.next_complete or <uint64_t>t >= self.next_post:
            raise BlsValueError(f"release({t}) without acquire({t})")
        self._finish(t, self.acquired_bytes)
        self.acquired = False
        return 0

    # ---------------------------------------------------------------- blocking


    def arrived(self, t):
        """Whether every rank has posted iteration ``t``, so ``complete(t)`` would not wait for a post.

        (It may still wait briefly for a sender in a blocking ``alltoallv``
        to copy into its record a block it offered for a direct read.)

        Never blocks (like ``MPI_Test``): for loops that complete an
        iteration as soon as its blocks are there and do other work until
        then.  True whenever ``complete(t)`` would return at once, even
        after an abort, and for an iteration this rank completed already
        (everything arrived; ``complete(t)`` would say it is done); otherwise
        raises like that wait: on a closed or
        aborted communicator, and ``PeerLostError`` once a rank that has not
        posted ``t`` died or closed (checked at most once per liveness slice,
        as a sleeping wait checks).
        """
        self._enter("arrived")
        try:
            return self._arrived(t)
        finally:
            self._leave()

    cdef bint _arrived(self, object t) except -1:
        cdef int64_t it = _iteration(t)
        self._check_owner()
        if it < 0:
            raise BlsValueError(f"arrived({it}): iterations start at 0")
        cdef bint all_attached = self.ready or self._poll_ready()
        self._check_not_closed_during("arrived", it)  # _poll_ready ran Python code
        if not all_attached:
            if self._aborted():
                self._raise_aborted()
            return False  # nobody posts before every rank attached: no need to wait for that
        # _first_behind loads with acquire, so a True answer also makes the
        # records visible to the complete(t) that follows.
        cdef int r = self._first_behind(PUBLISHED, <uint64_t>it + 1, 0)
        if r < 0:
            return True  # even after an abort, as complete(t) would not wait
        if self._aborted():  # read after the counters: a True above was not missed (see _wait)
            r = self._first_behind(PUBLISHED, <uint64_t>it + 1, r)
            if r < 0:
                return True
            self._raise_aborted()
        # A polling loop would otherwise spin forever on a dead peer.
        cdef int64_t now = bls_now_ns()
        if now >= self.next_liveness_ns:
            self.next_liveness_ns = now + self.slice_ns
            if self._check_alive(PUBLISHED, <uint64_t>it + 1, r, True) != OK:
                self._raise_aborted()
        return False

    def _counters(self):
        """``(published, completed)`` of every rank, read with acquire (for tests and tools)."""
        self._check_mapped()
        return ([bls_load_acquire(&self.ranks[r].published) for r in range(self.size)],
                [bls_load_acquire(&self.ranks[r].completed) for r in range(self.size)])

    def reset_stats(self):
        """Zero the waiting and traffic counters (see ``Comm.stats``)."""
        self.post_wait_ns = 0
        self.complete_wait_ns = 0
        self.futex_sleeps = 0
        self.cpu_moves = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.bytes_streamed = 0
        self.bytes_read_direct = 0

    # ------------------------------------------------------------ collectives

    def post(self, t, send, send_counts, *, timeout=DEFAULT_TIMEOUT):
        """Publish this rank's blocks of iteration ``t``; ``send`` may be reused at once.

        ``send`` is a C-contiguous numpy array or CPU torch tensor holding the
        blocks for ranks ``0..size-1`` back to back; ``send_counts[q]`` is the
        number of elements for rank ``q`` (they add up to ``send.size``).
        Waits only while some rank has not completed iteration
        ``t - lag - 1`` (the lag bound), given ``arena_bytes`` of at least
        ``lag + 2`` of the largest records.  With less, a record that does
        not fit waits for the other ranks to complete the records in its
        way, and raises ``ArenaFullError`` once the next of them is an
        iteration this rank has not completed itself (no wait could free
        it), at once if it is the first.  Iterations are posted in order
        ``0, 1, 2, ...``, and ``post(t)`` needs this rank's own
        ``complete(t - lag - 1)`` first.
        """
        cdef int64_t it
        cdef bint was_torch = False
        cdef int64_t deadline_ns = NO_DEADLINE_YET
        cdef uint64_t nbytes
        self._enter("post")
        try:
            it = _iteration(t)
            if not cnp.PyArray_CheckExact(send):
                send, was_torch = as_array(send, "send")
            if not self.ready:
                self._check_send(it, send, send_counts, &nbytes)  # bad input: said before waiting for peers
                self._ready_within(timeout, &deadline_ns)
            timeout = self._timeout_arg(timeout)
            self._post(it, send, send_counts, timeout, &deadline_ns)
            self.slot_torch[self._slot(it)] = was_torch
        finally:
            self._leave()

    def complete(self, t, out=None, *, timeout=DEFAULT_TIMEOUT):
        """Wait until every rank posted ``t``; return ``(recv, recv_counts)``.

        ``recv`` holds the blocks every rank posted to this one, in rank
        order; ``recv_counts`` (a read-only int64 array) their sizes in elements.  ``out``
        may supply the memory (same dtype, large enough; ``recv`` is then a
        view of it).  If ``out`` is too small nothing is completed and the
        call may be repeated.  Iterations complete in order, each after its
        own post.  ``recv`` is a torch tensor if ``out`` is one, or, without
        ``out``, if this rank's ``send`` was one.  Every rank must send one
        dtype in an iteration: a block of another dtype is found only here,
        after its sender published it, and aborts the communicator
        (:class:`CommAborted` in every rank).
        """
        cdef int64_t it
        cdef bint torch_recv
        cdef int64_t deadline_ns = NO_DEADLINE_YET
        self._enter("complete")
        try:
            it = _iteration(t)
            if not self.ready:
                self._check_complete_order(it)  # said before waiting for peers
                self._ready_within(timeout, &deadline_ns)
            timeout = self._timeout_arg(timeout)
            torch_recv = self.slot_torch[self._slot(it)]
            given_out = out
            if out is not None:
                torch_recv = False
                if not cnp.PyArray_CheckExact(out):
                    out, torch_recv = as_array(out, "out", written=True)
            result = self._complete(it, out, timeout, &deadline_ns)
        finally:
            self._leave()
        if torch_recv:
            if given_out is not None:
                mark_written(given_out)
            return to_torch(result[0]), result[1]
        return result

    def alltoallv(self, send, send_counts, out=None, *, timeout=DEFAULT_TIMEOUT):
        """Blocking alltoallv: ``post`` then ``complete`` of the next iteration.

        Same arguments and result as :meth:`post` and :meth:`complete`;
        ``timeout`` bounds the whole call, its post's waits and its
        complete's together.  With ``lag = 0`` this is an ordinary
        synchronous alltoallv: it returns only once every rank has posted
        ``t``.  Its post, like an eager MPI send, waits only for this
        sender's slot (``L + 2`` of them), so it may publish ``t`` while a peer
        still receives ``t - 1``; a split ``post(t)`` would wait for that.
        A timeout in its second half leaves ``t`` so published.  ``out``'s
        dtype is checked before posting; its size only once the blocks have
        arrived (their sizes are the senders'): if it is too small, the
        iteration stays posted and ``complete(t)`` with room enough ends it.

        Blocks of at least ``direct_min_bytes`` (32 KiB; 0 turns it off) for
        other ranks are not copied into this rank's record: each receiver
        copies its block straight from ``send`` (``process_vm_readv``), one
        copy instead of two, if it gets there before this call has received
        everything; the call then copies to the record the blocks nobody has
        read yet, waits for reads under way, and returns.  So it never waits
        for a late receiver, and ``send`` may change once it returns.  A
        receiver the kernel does not let read us (ptrace rules, another PID
        namespace) is sent through the record.  Under Yama's ptrace_scope 1
        (Ubuntu's default) the first call that may offer a block declares
        any process a permitted tracer of this one, as Open MPI does for
        the same reads, unless ``BLSSHM_PTRACER=keep``: see
        ``blsshm._proc.allow_peer_reads``.  If this wait for a read under
        way is cut short (a timeout, after at least 1 s; Ctrl-C; an abort),
        or a receiver's wait for a copy after it read another block
        directly, the communicator is aborted: neither call could be
        retried.  A receiver's other waits for a copy time out like any
        wait (``t`` stays posted).
        """
        self._enter("alltoallv")
        try:
            return self._alltoallv(send, send_counts, out, timeout)
        finally:
            self._leave()

    cdef object _alltoallv(self, object send, object send_counts, object out, object timeout):
        self._check_open()
        cdef int64_t t = self.next_post
        if self.next_complete != self.next_post:
            raise BlsValueError(
                f"alltoallv() while iterations {self.next_complete}..{t - 1} are posted "
                f"but not completed; complete them first")
        # One deadline for the whole call: the post's waits and the complete's.
        cdef int64_t deadline_ns = NO_DEADLINE_YET
        cdef uint64_t nbytes
        cdef bint was_torch = False
        if not cnp.PyArray_CheckExact(send):
            send, was_torch = as_array(send, "send")
        cdef bint torch_recv = was_torch  # as complete(): out's kind if given, else send's
        given_out = out
        if out is not None:
            torch_recv = False
            if not cnp.PyArray_CheckExact(out):
                out, torch_recv = as_array(out, "out", written=True)
            self._check_out(out, <cnp.dtype>cnp.PyArray_DESCR(<cnp.ndarray>send))  # before publishing
        if not self.ready:  # the input first: bad input is said before waiting for peers
            self._check_send(t, send, send_counts, &nbytes)
            self._ready_within(timeout, &deadline_ns)
        timeout = self._timeout_arg(timeout)
        if (self.permit_peer_reads and self.direct_min != 0 and self.size > 1
                and <uint64_t>cnp.PyArray_NBYTES(<cnp.ndarray>send) >= self.direct_min):
            self._permit_peer_reads()  # once: before our first offer is published
        # Our own block goes from send to out directly, unless out overlaps
        # send (the blocks gathered before it would overwrite it).
        cdef bint defer_own = out is None or not _overlap(<cnp.ndarray>send, <cnp.ndarray>out)
        self._post(t, send, send_counts, timeout, &deadline_ns, defer_own, True)
        self.slot_torch[self._slot(t)] = was_torch
        try:
            result = self._complete(t, out, timeout, &deadline_ns)
        finally:
            # If complete did not finish (a timeout, out too small), t stays
            # posted and a later complete(t) reads our blocks from the record.
            self._place_deferred_own()
            if self.offers_pending:
                self._take_back_offers(t, timeout)
        if torch_recv:
            if given_out is not None:
                mark_written(given_out)
            return to_torch(result[0]), result[1]
        return result

    cdef int _permit_peer_reads(self) except -1:
        from blsshm import _proc  # here: it is needed once per communicator at most
        _proc.allow_peer_reads()
        self.permit_peer_reads = False
        return 0

    def post_views(self, t, send_counts, dtype=np.float32, *, timeout=DEFAULT_TIMEOUT):
        """Zero-copy post: a context manager giving writable views of iteration ``t``'s record.

        ``with comm.post_views(t, counts, np.float32) as views:`` gives a
        tuple: ``views[q]`` is a 1-D array of ``counts[q]`` elements for rank
        ``q`` lying in shared memory; fill them (``views[q][:] = x``), and the
        record is published when the block exits normally.  On an exception
        nothing is published and ``t`` may be posted again.  Waits like
        :meth:`post` on entry.  The views turn read-only on exit (numpy will
        not make them writable again); do not keep writable slices of them
        past the block either, nor tensors made of them (``torch.from_numpy``
        does not see the flag change: a write through one after the block
        changes what receivers read).
        """
        cdef int64_t deadline_ns = NO_DEADLINE_YET
        cdef int64_t it
        cdef uint64_t nbytes
        self._enter("post_views")
        try:
            it = _iteration(t)
            if not self.ready:  # bad input: said before waiting for peers (checked again on entry)
                self._check_views_post(it, send_counts, dtype, &nbytes)
                self._ready_within(timeout, &deadline_ns)
            return PostViews(self, it, send_counts, dtype, self._timeout_arg(timeout), deadline_ns)
        finally:
            self._leave()

    def complete_views(self, t, *, timeout=DEFAULT_TIMEOUT):
        """Zero-copy complete: a context manager giving read-only views of what arrived.

        ``with comm.complete_views(t) as views:`` gives a tuple: ``views[s]``
        is the block rank ``s`` posted to this rank for ``t``, in shared
        memory, in the dtype rank ``s`` posted.  Leaving the block marks ``t``
        completed, after which the senders may overwrite those bytes: copy
        what must outlive the block.  That holds when an exception leaves
        it too (unlike ``post_views``, which then publishes nothing): what
        arrived for ``t`` cannot be read again.  A tensor made of a view
        (``torch.from_numpy`` only warns that it is read-only) is writable:
        an in-place operation on it writes into the sender's shared memory,
        and after the block into what the sender posts next; copy first.
        """
        cdef int64_t deadline_ns = NO_DEADLINE_YET
        cdef int64_t it
        self._enter("complete_views")
        try:
            it = _iteration(t)
            if not self.ready:
                self._check_complete_order(it)  # said before waiting for peers
                self._ready_within(timeout, &deadline_ns)
            return CompleteViews(self, it, self._timeout_arg(timeout), deadline_ns)
        finally:
            self._leave()

    cdef int _ready_within(self, object timeout, int64_t* deadline_ns) except -1:
        """The first collective call: wait for every rank to attach (``_make_ready``).

        Within ``attach_timeout``, and within the call's own ``timeout``
        argument if it has one, whose deadline then counts from here.  Not
        within the communicator's default timeout: a stall detector for
        the iterations, which peers that start slowly (importing torch, say)
        should not trip.
        """
        cdef int64_t timeout_ns
        if timeout is DEFAULT_TIMEOUT:
            self._make_ready(None)
            return 0
        timeout_ns = self._timeout_ns(timeout)
        if deadline_ns[0] == NO_DEADLINE_YET:
            deadline_ns[0] = -1 if timeout_ns < 0 else bls_now_ns() + timeout_ns
        self._make_ready(timeout)
        return 0

    def _make_ready(self, timeout=None):
        raise NotImplementedError


cdef cnp.dtype _as_numpy_dtype(object dtype):
    """``dtype`` as numpy's; a torch dtype is refused with the way to do it (views must be numpy's)."""
    if isinstance(dtype, np.dtype):
        return dtype
    if dtype is None:  # numpy reads None as float64, while the default here is float32
        raise BlsTypeError("dtype=None is refused (numpy reads it as float64); leave it out for float32")
    try:
        return np.dtype(dtype)
    except ValueError as exc:  # ("i4", -1), ("V", 2**40): a dtype-like of impossible shape or size
        raise BlsValueError(f"not a valid dtype: {dtype!r} ({exc})") from None
    except TypeError as exc:
        if type(dtype).__module__ == "torch":  # views turn read-only on exit, which a tensor cannot
            raise BlsTypeError(
                f"zero-copy views are numpy arrays; give the numpy dtype for {dtype} "
                f"and wrap a view with torch.from_numpy(views[q]) inside the block"
                + (" (bfloat16 has none: use numpy.uint16 and .view(torch.bfloat16))"
                   if str(dtype) == "torch.bfloat16" else "")) from None
        raise BlsTypeError(f"not a dtype: {dtype!r} ({exc})") from None


cdef bint _is_bool(object x):
    """Whether ``x`` is a boolean: ``True``, ``numpy.True_``, a 0-d bool array or tensor.

    ``operator.index`` and ``float`` take some of them as 0 or 1, which as a
    count, an iteration or a timeout is surely a mistake.
    """
    if type(x) is int or type(x) is float:
        return False
    if isinstance(x, (bool, np.bool_)):
        return True
    dtype = getattr(x, "dtype", None)  # a numpy dtype has kind 'b'; torch.bool has no kind
    return dtype is not None and (getattr(dtype, "kind", None) == "b" or str(dtype) == "torch.bool")


cdef int64_t _iteration(object t) except? -1:
    """An iteration number given by the caller, as an int64 (its sign is checked later)."""
    if type(t) is not int:
        if _is_bool(t) or not hasattr(type(t), "__index__"):  # 0.5 or "0" is a mistake
            raise BlsTypeError(f"the iteration must be an integer, got {type(t).__name__}")
        try:
            t = operator.index(t)
        except TypeError:  # a 0-d float tensor has __index__, which refuses it
            raise BlsTypeError(f"the iteration must be an integer, got {t!r}") from None
    try:
        return PyLong_AsLongLong(t)
    except OverflowError:
        raise BlsValueError(f"iteration {t} is out of range") from None


@cython.final
cdef class PostViews:
    """``with comm.post_views(...) as views``: publish on a normal exit, forget on an exception."""
    cdef Core comm
    cdef int64_t t
    cdef object counts, dtype, timeout
    cdef int64_t deadline_ns  # of the post_views() call, which may have waited for ranks to attach
    cdef tuple views  # handed out as they are: a tuple, so a mistaken views[q] = x
                      # raises instead of leaving the block unwritten

    def __cinit__(self, Core comm, int64_t t, counts, dtype, timeout, int64_t deadline_ns):
        self.comm, self.t, self.counts, self.dtype, self.timeout = comm, t, counts, dtype, timeout
        self.deadline_ns = deadline_ns
        self.views = ()

    def __enter__(self):
        # The call's deadline serves the first entry only: a retry after a
        # timeout gets a timeout of its own, not one already spent.
        cdef int64_t deadline_ns = self.deadline_ns
        self.deadline_ns = NO_DEADLINE_YET
        self.comm._enter("post_views")
        try:
            views = self.comm._zc_reserve(self.t, self.counts, self.dtype, self.timeout, &deadline_ns)
        finally:
            self.comm._leave()
        self.views = views
        return views

    def __exit__(self, exc_type, exc, tb):
        # A write after publishing would tear what receivers read: no more writes.
        cdef cnp.ndarray view
        for view in self.views:
            cnp.PyArray_CLEARFLAGS(view, cnp.NPY_ARRAY_WRITEABLE)
        if exc_type is None:
            self.comm._zc_commit(self.t)
        elif not self.comm.closed:
            self.comm._zc_cancel(self.t)
        return False


@cython.final
cdef class CompleteViews:
    """``with comm.complete_views(t) as views``: mark ``t`` completed on exit."""
    cdef Core comm
    cdef int64_t t
    cdef object timeout
    cdef int64_t deadline_ns  # as PostViews's

    def __cinit__(self, Core comm, int64_t t, timeout, int64_t deadline_ns):
        self.comm, self.t, self.timeout, self.deadline_ns = comm, t, timeout, deadline_ns

    def __enter__(self):
        cdef int64_t deadline_ns = self.deadline_ns  # as PostViews's
        self.deadline_ns = NO_DEADLINE_YET
        self.comm._enter("complete_views")
        try:
            return self.comm._zc_acquire(self.t, self.timeout, &deadline_ns)
        finally:
            self.comm._leave()

    def __exit__(self, exc_type, exc, tb):
        if not self.comm.closed:
            self.comm._zc_release(self.t)
        return False


def _allow_fence_free(bint allowed):
    """Whether communicators attached from now on in this process may skip the fence (tests)."""
    global fence_free_allowed
    fence_free_allowed = allowed


def membarrier_works():
    """Whether the kernel offers membarrier's global expedited barrier, so ranks announce without a fence."""
    return bool(bls_membarrier_available())


def futex_waitv_works():
    """Whether sleeping waits use ``futex_waitv`` here (Linux 5.16+, not
    refused by a seccomp filter), so that an abort or a peer's close wakes a
    sleeper at once however the two race.  Without it a sleeper sleeps on
    one counter, and such a wake may wait for the end of its liveness slice.
    """
    return bool(bls_futex_waitv_works())


def _sleep_on_one_futex(bint yes):
    """Tests only: sleep as on a kernel without ``futex_waitv`` (this process)."""
    global bls_waitv_support
    bls_waitv_support = -1 if yes else 0


def abort_unattached(segment, int rank, str reason):
    """For the launcher: abort the communicator for ``rank``, whose process
    exited without attaching; False if it had attached (its peers watch it
    then) or the communicator was aborted already.

    The slot is claimed first (its pid set to -1, as an attach would set it),
    so no late attach can take it; the rank's line then has no other writer.
    Ranks waiting for everyone to attach see the abort word at their next poll.
    """
    cdef Py_buffer buf
    PyObject_GetBuffer(segment, &buf, PyBUF_WRITABLE)
    cdef bls_rank_t* a
    cdef bls_abort_t* abort_line
    try:
        if buf.len < 2 * BLS_LINE or bls_load_acquire(&(<bls_header_t*>buf.buf).magic) != BLS_MAGIC:
            raise BlsValueError("not a blsshm segment (bad magic)")
        if (not 0 <= rank < <int>(<bls_header_t*>buf.buf).nranks
                or <size_t>buf.len < 2 * BLS_LINE + (<size_t>rank + 1) * sizeof(bls_rank_t)):
            raise BlsValueError(f"rank {rank} is not in the communicator")
        a = <bls_rank_t*>(<char*>buf.buf + 2 * BLS_LINE) + rank
        if not bls_cas32(<uint32_t*>&a.pid, 0, <uint32_t>-1):
            return False
        a.abort_kind = BLS_ABORT_PEER_LOST
        a.abort_lost_rank = rank
        data = _reason_bytes(reason)
        strncpy(a.abort_reason, data, BLS_REASON_CHARS - 1)
        # The CAS (acq_rel) publishes the fields above to whoever acquires the word.
        abort_line = <bls_abort_t*>(<char*>buf.buf + BLS_LINE)
        if not bls_cas32(&abort_line.word, 0, rank + 1):
            return False
        bls_futex_wake_all32(&abort_line.word)  # anyone asleep on it (_wait)
        return True
    finally:
        PyBuffer_Release(&buf)


cdef bytes _reason_bytes(str reason):
    """``reason`` as UTF-8 that fits the abort line.

    A longer one is cut at a character boundary and ends with "...", so the
    ranks that read it see that it was cut (not a mangled last character).
    """
    data = reason.encode("utf-8", "replace")
    if len(data) <= BLS_REASON_CHARS - 1:
        return data
    return data[:BLS_REASON_CHARS - 4].decode("utf-8", "ignore").encode("utf-8") + b"..."


cdef str _abort_text(int rank, bint peer_lost, int lost, str reason):
    if not peer_lost:
        return f"communicator aborted by rank {rank}: {reason}"
    if rank == lost:  # the launcher aborted for a rank that never attached
        return f"rank {lost} was lost: {reason}"
    return f"rank {lost} was lost: {reason} (noticed by rank {rank})"


def describe_abort(abort):
    """What a rank's exception says about ``abort``, a :func:`read_abort` result."""
    rank, kind, lost, reason = abort
    return _abort_text(rank, kind == "peer_lost", lost, reason)


def read_abort(segment):
    """``None``, or ``(rank, kind, lost_rank, reason)`` of the first abort of a segment.

    For observers that are not ranks (the launcher): ``kind`` is ``"user"``,
    ``"peer_lost"`` (``lost_rank`` names the lost rank) or ``"protocol"``.
    """
    cdef Py_buffer buf
    PyObject_GetBuffer(segment, &buf, PyBUF_SIMPLE)
    cdef bls_rank_t* a
    cdef uint32_t w
    try:
        if buf.len < 2 * BLS_LINE or bls_load_acquire(&(<bls_header_t*>buf.buf).magic) != BLS_MAGIC:
            raise BlsValueError("not a blsshm segment (bad magic)")
        w = bls_load_acquire32(&(<bls_abort_t*>(<char*>buf.buf + BLS_LINE)).word)
        if w == 0 or w > (<bls_header_t*>buf.buf).nranks:
            return None
        a = <bls_rank_t*>(<char*>buf.buf + 2 * BLS_LINE) + (w - 1)
        kind = {BLS_ABORT_USER: "user", BLS_ABORT_PEER_LOST: "peer_lost",
                BLS_ABORT_PROTOCOL: "protocol"}.get(a.abort_kind, "unknown")
        reason = (<bytes>(<char*>a.abort_reason)).decode("utf-8", "replace")
        return (w - 1, kind, a.abort_lost_rank, reason)
    finally:
        PyBuffer_Release(&buf)
