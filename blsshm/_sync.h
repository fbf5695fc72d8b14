/* Synchronisation primitives for blsshm: atomics, CPU pause, futex, clock.
 *
 * Every iteration counter and stamp has exactly one writer; the waiter
 * counts, the closes count, the abort word and a rank's pid are written by
 * several processes, with atomic read-modify-writes.  The rules used in
 * _core.pyx:
 *   - a writer makes data visible with store_release on a stamp or counter,
 *     so every byte it wrote before (blocks, descriptors, mailboxes) is visible
 *     to a reader whose load_acquire sees the new value;
 *   - a reader that has finished reading a sender's record says so with a
 *     store_release on its own `completed` counter, so its reads of the record
 *     happen before the sender, after load_acquire of that counter, reuses it;
 *   - sleeping uses a Dekker-style handshake (see Core._announce / _wait):
 *     acquire/release alone do not order a store before a later load, so the
 *     two sides each put a full barrier between them.  A rank registered for
 *     membarrier (bls_membarrier_register) puts only a compiler barrier on
 *     its side, the writer's, which runs on every post and complete; a
 *     sleeper then runs bls_membarrier_heavy, which acts as a full barrier
 *     in every registered process at once (the asymmetric Dekker of liburcu
 *     and folly): the fast path pays nothing and the sleep, which costs a
 *     syscall anyway, pays one more.
 */
#ifndef BLSSHM_SYNC_H
#define BLSSHM_SYNC_H

#include <stdint.h>
#include <errno.h>
#include <time.h>
#include <limits.h>
#include <poll.h>
#include <unistd.h>
#include <sched.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <linux/futex.h>

#ifndef F_OFD_GETLK  /* <fcntl.h> shows them only under _GNU_SOURCE (Python.h sets it) */
#define F_OFD_GETLK 36
#define F_OFD_SETLK 37
#endif

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "blsshm sleeps on the low 32 bits of a 64-bit counter: little-endian only"
#endif

static inline uint64_t bls_load_acquire(const volatile uint64_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline uint32_t bls_load_acquire32(const volatile uint32_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline void bls_store_release(volatile uint64_t *p, uint64_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
static inline void bls_store_release32(volatile uint32_t *p, uint32_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
/* Compare-and-swap for the words more than one process may write: the abort
 * word (the first rank to abort wins, later ones keep its reason) and a rank's
 * pid (claimed by the one process that attaches as that rank, or by
 * abort_unattached for a rank that never will).  Acq_rel: a winner sees what
 * the words' earlier writers published, and what it writes after the claim is
 * published by its own release stores (the state after the pid). */
static inline int bls_cas32(volatile uint32_t *p, uint32_t expected, uint32_t desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0,
                                       __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}
/* Atomic exchange, for the claim that makes one thread of a rank the one
 * that writes its abort fields (see Core._abort_nogil). */
static inline uint32_t bls_exchange32(volatile uint32_t *p, uint32_t v) {
    return __atomic_exchange_n(p, v, __ATOMIC_ACQ_REL);
}
/* Waiter registration counts are written by the waiters (many writers) on
 * the slow path only; a full-barrier read-modify-write is what the sleep
 * handshake needs anyway. */
static inline void bls_add32(volatile uint32_t *p, int32_t v) {
    __atomic_fetch_add(p, (uint32_t)v, __ATOMIC_SEQ_CST);
}
static inline void bls_fence(void) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
/* Keeps the compiler from moving memory accesses across it; the CPU may. */
static inline void bls_compiler_barrier(void) {
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

/* membarrier(2) commands (<linux/membarrier.h> may be missing or old). */
#define BLS_MEMBARRIER_CMD_QUERY 0
#define BLS_MEMBARRIER_CMD_GLOBAL_EXPEDITED (1 << 1)
#define BLS_MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED (1 << 2)

/* Whether the kernel offers the two commands (Linux 4.16+), without registering. */
static inline int bls_membarrier_available(void) {
#ifdef SYS_membarrier
    long cmds = syscall(SYS_membarrier, BLS_MEMBARRIER_CMD_QUERY, 0);
    int need = BLS_MEMBARRIER_CMD_GLOBAL_EXPEDITED | BLS_MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED;
    return cmds >= 0 && (cmds & need) == need;
#else
    return 0;
#endif
}

/* Register this process to take part in bls_membarrier_heavy.  Per process
 * (every thread), kept across fork and until exec; registering again is
 * harmless.  The first registration of a process with threads waits for an
 * RCU grace period (5-18 ms here).  Returns 1 if registered, 0 if not (no
 * such syscall, a seccomp filter, an older kernel): the caller then keeps
 * its fences. */
static inline int bls_membarrier_register(void) {
#ifdef SYS_membarrier
    if (!bls_membarrier_available())
        return 0;
    return syscall(SYS_membarrier, BLS_MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED, 0) == 0;
#else
    return 0;
#endif
}

/* A full barrier in this thread and, in effect, in every running thread of
 * every registered process, at some point of its program order during this
 * call (an IPI; threads not running are between barriers anyway).  0 on
 * success, -1 with errno otherwise. */
static inline int bls_membarrier_heavy(void) {
#ifdef SYS_membarrier
    return (int)syscall(SYS_membarrier, BLS_MEMBARRIER_CMD_GLOBAL_EXPEDITED, 0);
#else
    errno = ENOSYS;
    return -1;
#endif
}
static inline uint32_t bls_load_relaxed32(const volatile uint32_t *p) {
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}
static inline void bls_store_relaxed32(volatile uint32_t *p, uint32_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
}

static inline void bls_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

static inline int64_t bls_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* The same clock as of the last tick (a few ms behind at most), read without
 * the TSC: cheap enough for every post to ask whether a slice has passed. */
static inline int64_t bls_coarse_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* The futex word is the low half of a 64-bit counter (little-endian checked
 * above).  The mapping is shared between processes, so no FUTEX_PRIVATE_FLAG.
 * Returns 0 when woken or when the word no longer holds `expected`, -1 with
 * errno ETIMEDOUT/EINTR otherwise; callers re-check their condition anyway. */
static inline int bls_futex_wait(volatile uint64_t *counter, uint32_t expected, int64_t timeout_ns) {
    struct timespec ts;
    ts.tv_sec = timeout_ns / 1000000000LL;
    ts.tv_nsec = timeout_ns % 1000000000LL;
    long rc = syscall(SYS_futex, (uint32_t *)counter, FUTEX_WAIT, expected, &ts, NULL, 0);
    if (rc == -1 && errno == EAGAIN) return 0;
    return (int)rc;
}
static inline void bls_futex_wake_all32(volatile uint32_t *word) {
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}
static inline void bls_futex_wake_all(volatile uint64_t *counter) {
    bls_futex_wake_all32((volatile uint32_t *)counter);  /* its low half (little-endian, above) */
}

/* futex_waitv (Linux 5.16): sleep until any of several 32-bit words is
 * woken, the kernel checking every word against its expected value as it
 * queues the sleeper.  A waiter that passes the abort word and the count of
 * closed ranks as well as its peer's counter cannot miss an abort or a close
 * that lands between its last look and its sleep: either the kernel sees the
 * changed word and returns at once, or the writer's wake finds it queued.
 * (One futex only covers the counter, so such an abort or close would be
 * noticed only when the sleep's slice ended.)  Declared here rather than
 * taken from <linux/futex.h>, whose copy may predate it. */
#ifndef SYS_futex_waitv
#define SYS_futex_waitv 449
#endif
struct bls_futex_waitv {
    uint64_t val;
    uint64_t uaddr;
    uint32_t flags;
    uint32_t reserved;
};
#define BLS_FUTEX2_SIZE_U32 0x02   /* FUTEX2_SIZE_U32; no FUTEX2_PRIVATE: the words are shared */
struct bls_kernel_timespec {       /* __kernel_timespec: 64-bit fields even where time_t is 32 */
    int64_t tv_sec;
    int64_t tv_nsec;
};

/* 1 once futex_waitv worked, -1 once the kernel (or a seccomp filter)
 * refused it, 0 before the first sleep.  Racing first sleeps in two threads
 * both find the same answer (relaxed: the value is all they share). */
static int bls_waitv_support = 0;

/* Sleep on `counter`'s low half (expected `seen`), the abort word (expected
 * 0) and the closes word (expected `closes_seen`), for at most `timeout_ns`.
 * Returns as bls_futex_wait.  Without futex_waitv it sleeps on the counter
 * alone, as before. */
static inline int bls_futex_wait3(volatile uint64_t *counter, uint32_t seen,
                                  volatile uint32_t *abort_word,
                                  volatile uint32_t *closes, uint32_t closes_seen,
                                  int64_t timeout_ns) {
    if (__atomic_load_n(&bls_waitv_support, __ATOMIC_RELAXED) >= 0) {
        struct bls_futex_waitv w[3];
        struct timespec now;
        struct bls_kernel_timespec deadline;
        memset(w, 0, sizeof w);
        w[0].uaddr = (uint64_t)(uintptr_t)counter;
        w[0].val = seen;
        w[1].uaddr = (uint64_t)(uintptr_t)abort_word;
        w[1].val = 0;
        w[2].uaddr = (uint64_t)(uintptr_t)closes;
        w[2].val = closes_seen;
        w[0].flags = w[1].flags = w[2].flags = BLS_FUTEX2_SIZE_U32;
        /* futex_waitv takes an absolute deadline. */
        clock_gettime(CLOCK_MONOTONIC, &now);
        int64_t end_ns = (int64_t)now.tv_nsec + timeout_ns % 1000000000LL;
        deadline.tv_sec = (int64_t)now.tv_sec + timeout_ns / 1000000000LL + end_ns / 1000000000LL;
        deadline.tv_nsec = end_ns % 1000000000LL;
        long rc = syscall(SYS_futex_waitv, w, 3, 0, &deadline, CLOCK_MONOTONIC);
        if (rc >= 0 || errno == EAGAIN || errno == ETIMEDOUT || errno == EINTR) {
            __atomic_store_n(&bls_waitv_support, 1, __ATOMIC_RELAXED);
            return rc >= 0 || errno == EAGAIN ? 0 : -1;
        }
        /* ENOSYS (before 5.16), EPERM (a seccomp filter) or anything else:
         * fall back below, from now on, rather than return at once from
         * every sleep and spin. */
        __atomic_store_n(&bls_waitv_support, -1, __ATOMIC_RELAXED);
    }
    return bls_futex_wait(counter, seen, timeout_ns);
}

/* Whether sleeps use futex_waitv here (asks the kernel once if not yet known:
 * a wait on a word that does not hold the expected value returns at once). */
static inline int bls_futex_waitv_works(void) {
    if (__atomic_load_n(&bls_waitv_support, __ATOMIC_RELAXED) == 0) {
        uint64_t counter = 1;
        uint32_t zero = 0;
        bls_futex_wait3(&counter, 0, &zero, &zero, 0, 1000000);
    }
    return __atomic_load_n(&bls_waitv_support, __ATOMIC_RELAXED) > 0;
}

/* 1 if the process behind a pidfd has exited (a zombie counts as exited:
 * its parent may not have reaped it yet), 0 if it runs, -1 on error. */
static inline int bls_pidfd_exited(int pidfd) {
    struct pollfd p;
    p.fd = pidfd;
    p.events = POLLIN;
    p.revents = 0;
    int rc = poll(&p, 1, 0);
    if (rc < 0) return -1;
    return rc > 0 ? 1 : 0;
}

/* Liveness without pids.  Each rank holds a write lock on byte `rank` of
 * its own open file description of the segment for as long as it lives: the
 * kernel drops an open-file-description (OFD) lock when the last descriptor
 * of that description closes, which a dying process does at exit, before it
 * is a zombie.  Unlike a pid, that works across PID namespaces and cannot be
 * recycled.  (A classic POSIX lock would not do: it goes when the process
 * closes *any* descriptor of the file.)  The lock covers byte `byte` only. */
static inline struct flock bls_byte_write_lock(int byte) {
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = byte;
    fl.l_len = 1;
    return fl;
}

/* Take the lock on `byte` of `fd`'s description: 0 on success, else errno. */
static inline int bls_lock_hold(int fd, int byte) {
    struct flock fl = bls_byte_write_lock(byte);
    return fcntl(fd, F_OFD_SETLK, &fl) == 0 ? 0 : errno;
}

/* 1 if nobody holds the lock on `byte` any more (its rank closed its
 * descriptor or exited), 0 if someone does, -1 on error. */
static inline int bls_lock_released(int fd, int byte) {
    struct flock fl = bls_byte_write_lock(byte);
    if (fcntl(fd, F_OFD_GETLK, &fl) == -1) return -1;
    return fl.l_type == F_UNLCK ? 1 : 0;
}

/* Last resort, for a peer in our PID namespace that has neither a pidfd nor
 * a liveness lock (old kernel, seccomp): 1 if no process `pid` runs any more
 * (gone, or a zombie its parent has not reaped), 0 otherwise.  Reads
 * /proc/<pid>/stat; a recycled pid is not detected. */
static inline int bls_pid_exited(int pid) {
    char path[64], buf[512];
    if (pid <= 0) return 0;
    if (kill(pid, 0) == -1 && errno == ESRCH) return 1;
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (f == NULL) return errno == ENOENT ? 1 : 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *close_paren = strrchr(buf, ')');  /* the command name may hold spaces */
    if (close_paren == NULL || close_paren[1] == 0) return 0;
    return close_paren[2] == 'Z' || close_paren[2] == 'X';
}

static inline void bls_yield(void) { sched_yield(); }

/* a * b into *product; nonzero if it overflowed. */
static inline int bls_mul_overflow(uint64_t a, uint64_t b, uint64_t *product) {
    return __builtin_mul_overflow(a, b, product);
}

/* The CPU the caller runs on, or -1 (glibc answers from rseq/vDSO: a few ns). */
static inline int bls_current_cpu(void) { return sched_getcpu(); }

#endif
