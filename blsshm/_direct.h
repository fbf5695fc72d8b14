/* Direct reads of a peer's memory (process_vm_readv, "cross-memory attach"):
 * how a receiver takes a large block straight from the sender's send buffer
 * (see BLS_DIRECT_* in _layout.h). */
#ifndef BLSSHM_DIRECT_H
#define BLSSHM_DIRECT_H

#include <errno.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

/* One call moves at most this much (the kernel's MAX_RW_COUNT). */
#define BLS_DIRECT_CHUNK 0x7FFFF000ULL

/* Copy n bytes at `remote` in process `pid` to `dst`: 0, or the errno of the
 * failure (EPERM: ptrace rules forbid it; ESRCH: the process is gone;
 * EFAULT: the range is not mapped there; ENOSYS: no such call).  A short
 * read goes on from where it stopped; one that moves nothing is EFAULT. */
static inline int bls_read_peer(int pid, char *dst, uint64_t remote, uint64_t n) {
    while (n > 0) {
        size_t len = n < BLS_DIRECT_CHUNK ? (size_t)n : (size_t)BLS_DIRECT_CHUNK;
        struct iovec local = {dst, len};
        struct iovec from = {(void *)(uintptr_t)remote, len};
        long got = syscall(SYS_process_vm_readv, pid, &local, 1UL, &from, 1UL, 0UL);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (got == 0)
            return EFAULT;
        dst += got;
        remote += (uint64_t)got;
        n -= (uint64_t)got;
    }
    return 0;
}

#endif
