/* Streaming (non-temporal) copy for a sender's blocks to other ranks.
 *
 * A sender writes its record into arena lines that receivers read a few
 * iterations before, so those lines still sit in another core's cache.  An
 * ordinary store must first own each line: a read-for-ownership that crosses
 * cores.  When the two cores share no cache (on the VMs we measure, often
 * for minutes at a time) that made copying 1 MiB into the arena 3-5x slower
 * than a local memcpy.  A streaming store writes whole lines without reading
 * them, so its speed does not depend on where the old lines are; but the
 * lines then go to memory, and in the fast case a receiver reads them from
 * there instead of from a shared cache.  Core chooses between the two by
 * measuring (see Core._copy_strategy).
 *
 * Streaming stores are weakly ordered: Intel documents no ordering between
 * them and other loads or stores.  A post therefore brackets its streaming
 * copies: bls_stream_begin (mfence) keeps them after the acquire loads that
 * showed every receiver done with the old bytes of these lines (of their
 * `completed` counts, or of their stamps of a later iteration: see
 * Core._finish), and
 * bls_stream_end (sfence) keeps them before the release store that
 * publishes the record (its stamp).
 */
#ifndef BLSSHM_COPY_H
#define BLSSHM_COPY_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#define BLS_HAVE_STREAM 1

static inline void bls_stream_copy(char *dst, const char *src, size_t n) {
    /* Ordinary stores up to dst's next 64-byte boundary, so every streaming
     * store below fills a whole line (partial lines would be read anyway). */
    size_t head = (size_t)(-(uintptr_t)dst) & 63;
    if (head > n)
        head = n;
    memcpy(dst, src, head);
    dst += head;
    src += head;
    n -= head;
    size_t body = n & ~(size_t)63;
    for (size_t i = 0; i < body; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
        _mm_stream_si128((__m128i *)(dst + i), a);
        _mm_stream_si128((__m128i *)(dst + i + 16), b);
        _mm_stream_si128((__m128i *)(dst + i + 32), c);
        _mm_stream_si128((__m128i *)(dst + i + 48), d);
    }
    memcpy(dst + body, src + body, n - body);
}

static inline void bls_stream_begin(void) { _mm_mfence(); }
static inline void bls_stream_end(void) { _mm_sfence(); }
#else
#define BLS_HAVE_STREAM 0

static inline void bls_stream_copy(char *dst, const char *src, size_t n) {
    memcpy(dst, src, n);
}

static inline void bls_stream_begin(void) {}
static inline void bls_stream_end(void) {}
#endif

/* Ask for ownership of the lines of dst[0..n) ahead of a small cached copy.
 *
 * A record's lines were last read by a receiver on another core, so each
 * ordinary store first needs a read-for-ownership across cores (about as
 * long as a cache-line transfer).  memcpy's stores wait for those one after
 * another as the store buffer fills; prefetchw requests all of them at once.
 * At P = 2 (old and new code alternating), a 1 KiB-per-pair alltoallv took
 * 10-15 % less and 4 KiB 3-8 % less; 64 KiB took 3 % more (the hardware
 * prefetcher keeps up there), so Core uses it only below STREAM_MIN_BYTES.
 * prefetchw (PRFCHW) is in x86 CPUs since Broadwell and Zen; on older ones
 * nothing is asked (a read prefetch would fetch the line shared, and the
 * store would then ask again).
 */
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

static int bls_have_prfchw;  /* set once, by bls_copy_init at import */

static inline void bls_copy_init(void) {
    unsigned a, b, c, d;
    bls_have_prfchw = __get_cpuid(0x80000001u, &a, &b, &c, &d) && ((c >> 8) & 1);  /* ECX.PRFCHW */
}

static inline void bls_prefetch_for_write(char *dst, size_t n) {
    char *line = (char *)((uintptr_t)dst & ~(uintptr_t)63);
    if (bls_have_prfchw) {
        for (; line < dst + n; line += 64)
            __asm__ volatile("prefetchw %0" : : "m"(*line));
    }
}
#else
static inline void bls_copy_init(void) {}

static inline void bls_prefetch_for_write(char *dst, size_t n) {
    char *line = (char *)((uintptr_t)dst & ~(uintptr_t)63);
    for (; line < dst + n; line += 64)
        __builtin_prefetch(line, 1, 3);
}
#endif

#endif /* BLSSHM_COPY_H */
