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
 * copies: bls_stream_begin (mfence) keeps them after the acquire load that
 * saw every receiver done with the old bytes of these lines, and
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

#endif /* BLSSHM_COPY_H */
