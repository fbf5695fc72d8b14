/* The shared-memory layout of one blsshm communicator (DESIGN §3).
 *
 *   offset 0                  bls_header_t        written once by the creator
 *   BLS_LINE                  bls_abort_t         the abort word (first aborter wins), closes
 *   2 * BLS_LINE              bls_rank_t[P]       per-rank counters, 3 lines each
 *   descs_offset              P x S descriptors (S = L+2 slots) of desc_stride bytes
 *   mbox_offset               P x P x S mailboxes of one line (0: none)
 *   arenas_offset             P arenas of arena_bytes bytes (byte rings of records)
 *
 * The counters sit on 128-byte lines apart from one another (two 64-byte
 * lines, because adjacent-line prefetch pairs them), each with the count of
 * its registered waiters (written on the slow path only) on its line; the
 * closes count shares the abort word's line, and a rank's third line holds
 * its rarely written state (pid, CPU hint).  Descriptors and mailboxes are
 * multiples of 128 bytes.
 */
#ifndef BLSSHM_LAYOUT_H
#define BLSSHM_LAYOUT_H

#include <stdint.h>

#define BLS_LINE 128
#define BLS_MAGIC 0x314d485353534c42ULL /* "BLSSSHM1" */
#define BLS_VERSION 9
#define BLS_BLOCK_ALIGN 64              /* each per-destination block starts on a cache line */
#define BLS_DTYPE_CHARS 20
#define BLS_REASON_CHARS (BLS_LINE - 32) /* abort reason, NUL included */

/* rank states (bls_rank_t.state) */
#define BLS_STATE_EMPTY 0
#define BLS_STATE_ATTACHED 1
#define BLS_STATE_CLOSED 2

/* abort kinds (bls_rank_t.abort_kind of the rank named by the abort word) */
#define BLS_ABORT_USER 1
#define BLS_ABORT_PEER_LOST 2
#define BLS_ABORT_PROTOCOL 3

typedef struct {
    uint64_t magic;
    uint32_t version;
    uint32_t nranks;
    uint32_t lag;
    uint32_t desc_stride;
    uint64_t arena_bytes;
    uint64_t segment_bytes;
    uint64_t descs_offset;
    uint64_t arenas_offset;
    uint64_t mbox_offset;          /* 0 when the segment has no mailboxes */
    char _pad[BLS_LINE - 64];
} bls_header_t;

typedef struct {
    uint32_t word;    /* 0 while running, else 1 + the rank that aborted first */
    uint32_t closes;  /* ranks that closed so far: sleepers wait on it too (see _sync.h) */
    char _pad[BLS_LINE - 8];
} bls_abort_t;

typedef struct {
    /* line 0, written by its rank on every post */
    uint64_t published;            /* iterations posted so far; futex on its low half */
    uint32_t published_sleepers;   /* ranks asleep on it (they write it, slow path only) */
    uint32_t fence_free;           /* 1: this rank announces with no fence; sleepers on its
                                      counters run bls_membarrier_heavy (set before attaching) */
    char _pad0[BLS_LINE - 16];
    /* line 1, written by its rank on every complete */
    uint64_t completed;            /* iterations completed so far; futex on its low half */
    uint32_t completed_sleepers;
    char _pad1[BLS_LINE - 12];
    /* line 2, written rarely: attach, close, abort, moving to another CPU */
    uint32_t state;
    int32_t pid;
    uint32_t abort_kind;
    int32_t abort_lost_rank;
    uint64_t pid_ns;               /* inode of its PID namespace (0: unknown): where `pid` means that process */
    uint32_t cpu_hint;             /* 1 + the CPU this rank last waited on (0: unknown) */
    uint32_t holds_lock;           /* 1: it holds the liveness lock on byte `rank` of the segment (see _sync.h) */
    char abort_reason[BLS_REASON_CHARS];
} bls_rank_t;

/* One per sender and iteration slot (t mod S), used only by segments
 * without mailboxes: written by the sender when it posts t, `stamp` last;
 * receivers poll the stamp, then read where their block is.  (With
 * mailboxes, each receiver's mailbox says where its block is: one line to
 * read before the block instead of two.) */
typedef struct {
    uint64_t stamp;                /* t + 1 once iteration t is posted (0: never) */
    uint64_t record_offset;        /* from the start of the sender's arena */
    uint64_t record_bytes;
    uint32_t itemsize;
    char dtype[BLS_DTYPE_CHARS];   /* numpy dtype.str, NUL-terminated */
    uint64_t blocks[];             /* per destination: offset in record, byte count */
} bls_desc_t;

/* One per (sender, receiver, iteration slot), when the segment has them:
 * what the sender posted to that receiver.  A small block travels inside
 * (`inline_data`), so the one line the receiver polls also brings the bytes;
 * a larger one stays in the sender's record, at `block_offset` from the
 * start of the sender's arena.  The sender writes everything else first and
 * `stamp` last. */
#define BLS_MBOX_DATA (BLS_LINE - 48)
typedef struct {
    uint64_t stamp;                /* t + 1 once iteration t is posted (0: never) */
    uint64_t nbytes;               /* bytes for this receiver */
    uint32_t inline_data;          /* 1: they are in data[]; 0: in the sender's record */
    uint32_t itemsize;
    char dtype[BLS_DTYPE_CHARS];   /* numpy dtype.str, NUL-terminated */
    char _pad[4];
    union {
        char data[BLS_MBOX_DATA];  /* inline: the block; 16-byte aligned (the struct is line-aligned) */
        struct {
            uint64_t block_offset; /* in the record: where the block starts in the sender's arena */
            uint64_t direct_addr;  /* offered for a direct read: the block's address in the sender */
            uint32_t direct_state; /* BLS_DIRECT_*: who may read or write the block now */
        };
    };
} bls_mbox_t;

/* A blocking alltoallv may offer a large block for a direct read: the
 * receiver copies it from the sender's send buffer with process_vm_readv,
 * one copy instead of two (into the record, out of it).  The record keeps
 * room for it; `direct_state` hands the block over:
 *
 *   OFFERED   --receiver CAS-->  CLAIMED  --read-->  DONE
 *                                         --read failed-->  REFUSED
 *   OFFERED   --receiver CAS-->  WANTED    (zero copy: it needs the record)
 *   OFFERED   --sender CAS-->  WITHDRAWN --copies to the record-->  FILLED
 *   REFUSED, WANTED  --sender copies to the record-->  FILLED
 *   CLAIMED   --sender CAS-->  ABANDONED  (it aborted first: see below)
 *
 * A receiver ends its read with a CAS CLAIMED -> DONE.  The sender returns
 * from the call once each offer is DONE or FILLED: it waits while one is
 * CLAIMED (a read in progress), so its buffer stays unchanged while anyone
 * reads it; another rank's abort does not end that wait before a grace
 * period (the read ends first, and both complete the iteration).  Only if
 * the wait fails (a timeout, Ctrl-C, a read outlasting that grace) does it
 * abort the communicator and then take the claim back (ABANDONED): the
 * reader's CAS then fails, and it raises instead of returning what it read. */
#define BLS_DIRECT_NONE 0       /* the block is in the record (or inline) */
#define BLS_DIRECT_OFFERED 1
#define BLS_DIRECT_CLAIMED 2
#define BLS_DIRECT_DONE 3
#define BLS_DIRECT_REFUSED 4
#define BLS_DIRECT_WANTED 5
#define BLS_DIRECT_WITHDRAWN 6
#define BLS_DIRECT_FILLED 7
#define BLS_DIRECT_ABANDONED 8

_Static_assert(sizeof(bls_header_t) == BLS_LINE, "header is one line");
_Static_assert(sizeof(bls_mbox_t) == BLS_LINE, "a mailbox is one line");
_Static_assert(sizeof(bls_abort_t) == BLS_LINE, "abort word is one line");
_Static_assert(sizeof(bls_rank_t) == 3 * BLS_LINE, "rank block is three lines");
_Static_assert(sizeof(bls_desc_t) == 48, "descriptor head is 48 bytes");

#endif
