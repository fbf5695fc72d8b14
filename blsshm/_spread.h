/* CPU placement helpers for blsshm: which CPUs this process may use, and a
 * one-off move to one of them.
 *
 * With more ranks than CPUs the kernel can leave the ranks unevenly spread
 * (3 on one CPU, 1 on the other) for seconds, because ranks that wait by
 * spinning or yielding keep every CPU busy and a busy CPU balances only
 * rarely; even 2 ranks started on one CPU of 2 stayed there for thousands of
 * iterations while the other was idle.  Core._spread_out detects that from
 * the ranks' CPU hints and moves one rank (see there).  A move pins the
 * calling thread (the one using the
 * communicator) to the new CPU and then restores its own affinity mask: a
 * running thread is not migrated off an allowed CPU when its mask widens, so
 * it stays there, and the kernel stays free to move it later; a mask the
 * user set is never widened.  One thing does change: the restored mask is
 * what the kernel reported, the CPUs then allowed and online, so on Linux
 * 6.2+ CPUs that a cgroup adds or that come online later are not used by a
 * rank that moved (they are by one that never did).
 */
#ifndef BLSSHM_SPREAD_H
#define BLSSHM_SPREAD_H

#include <sched.h>
#include <string.h>

/* Up to `max` CPUs this process may run on, ascending, into `cpus`; how many (-1: unknown). */
static inline int bls_allowed_cpus(int *cpus, int max) {
    cpu_set_t mask;
    if (sched_getaffinity(0, sizeof mask, &mask) != 0) return -1;
    int n = 0;
    for (int cpu = 0; cpu < CPU_SETSIZE && n < max; cpu++)
        if (CPU_ISSET(cpu, &mask)) cpus[n++] = cpu;
    return n;
}

/* Move the calling thread to `cpu` now, keeping its affinity mask; 0 on success. */
static inline int bls_move_to_cpu(int cpu) {
    cpu_set_t mask, one;
    if (cpu < 0 || cpu >= CPU_SETSIZE || sched_getaffinity(0, sizeof mask, &mask) != 0
            || !CPU_ISSET(cpu, &mask))
        return -1;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    if (sched_setaffinity(0, sizeof one, &one) != 0) return -1;  /* returns on `cpu` */
    if (sched_setaffinity(0, sizeof mask, &mask) == 0) return 0;
    /* Every CPU of the mask went away (a cgroup's cpuset shrank) since we read
     * it.  Rather than stay pinned to `cpu`, ask for every CPU: the kernel
     * keeps those of the cpuset, which is where it puts a task whose mask
     * lost all its CPUs anyway. */
    memset(&mask, 0xff, sizeof mask);
    sched_setaffinity(0, sizeof mask, &mask);
    return 0;
}

#endif
