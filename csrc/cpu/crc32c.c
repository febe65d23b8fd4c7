/* CRC-32C: SSE4.2 three-way interleaved fast path with run-time dispatch, portable slicing-by-8
 * fallback, and O(log n) combination. See crc32c.h for the conventions.
 *
 * The three-way scheme (after Mark Adler's crc32c.c): the crc32 instruction has a latency of three
 * cycles and a throughput of one per cycle, so three independent streams over adjacent blocks keep
 * it busy; the three partial CRCs are then merged by "shifting" a CRC over a block of zeros, which
 * is a multiplication by x^(8*block) modulo the polynomial, done with four table lookups.
 */
#include "crc32c.h"

#include <pthread.h>
#include <string.h>

#define POLY 0x82f63b78u /* CRC-32C, bit-reflected */

/* ---------------------------------------------------------------- GF(2) polynomial arithmetic */

/* a * b modulo POLY, both bit-reflected (bit 31 is x^0). */
static uint32_t multmodp(uint32_t a, uint32_t b)
{
    uint32_t m = (uint32_t)1 << 31, p = 0;
    for (;;) {
        if (a & m) {
            p ^= b;
            if ((a & (m - 1)) == 0)
                break;
        }
        m >>= 1;
        b = (b & 1) ? (b >> 1) ^ POLY : b >> 1;
    }
    return p;
}

/* x^(2^n) mod POLY for every n reached: n < 64 + 3 (x2nmodp's k is 3 for bytes). No wrap-around:
 * zlib's `k & 31` relies on x^(2^32) = x for its CRC-32 polynomial, which does not hold for CRC-32C
 * (it made combine wrong for len_b >= 512 MiB). */
#define X2N 67
static uint32_t x2n_table[X2N];

/* x^(n * 2^k) mod POLY, k <= 3 */
static uint32_t x2nmodp(uint64_t n, unsigned k)
{
    uint32_t p = (uint32_t)1 << 31; /* x^0 */
    while (n) {
        if (n & 1)
            p = multmodp(x2n_table[k], p);
        n >>= 1;
        k++;
    }
    return p;
}

/* ---------------------------------------------------------------- tables, built once */

static uint32_t table[8][256]; /* slicing-by-8 */

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FM_CRC_X86 1
#include <nmmintrin.h>
#define LONG_BLOCK 8192
#define SHORT_BLOCK 256
static uint32_t shift_long[4][256];  /* CRC -> CRC followed by LONG_BLOCK zero bytes (unconditioned) */
static uint32_t shift_short[4][256];
static uint32_t crc32c_sse42(uint32_t crc, const void *buf, size_t len);
#endif

typedef uint32_t (*crc_fn)(uint32_t, const void *, size_t);
static crc_fn crc_impl = fm_crc32c_portable;
static const char *crc_impl_name = "table";
static pthread_once_t once = PTHREAD_ONCE_INIT;

#ifdef FM_CRC_X86
static void make_shift_table(uint32_t tab[4][256], uint64_t nbytes)
{
    uint32_t op = x2nmodp(nbytes, 3);
    for (int k = 0; k < 4; k++)
        for (uint32_t n = 0; n < 256; n++)
            tab[k][n] = multmodp(op, n << (8 * k));
}
#endif

static void init_tables(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ POLY : c >> 1;
        table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++)
        for (int k = 1; k < 8; k++)
            table[k][n] = (table[k - 1][n] >> 8) ^ table[0][table[k - 1][n] & 0xff];

    uint32_t p = (uint32_t)1 << 30; /* x^1 */
    x2n_table[0] = p;
    for (int n = 1; n < X2N; n++)
        x2n_table[n] = p = multmodp(p, p);

#ifdef FM_CRC_X86
    make_shift_table(shift_long, LONG_BLOCK);
    make_shift_table(shift_short, SHORT_BLOCK);
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2")) {
        crc_impl = crc32c_sse42;
        crc_impl_name = "sse4.2";
    }
#endif
}

static inline void ensure_init(void) { pthread_once(&once, init_tables); }

/* ---------------------------------------------------------------- portable */

uint32_t fm_crc32c_portable(uint32_t crc, const void *buf, size_t len)
{
    ensure_init();
    const unsigned char *p = (const unsigned char *)buf;
    uint32_t c = ~crc;
    while (len && ((uintptr_t)p & 7)) {
        c = table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
        len--;
    }
    while (len >= 8) {
        /* byte-wise assembly keeps this endian-independent; compilers fuse it into loads */
        uint32_t lo = c ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
        uint32_t hi = (uint32_t)p[4] | (uint32_t)p[5] << 8 | (uint32_t)p[6] << 16 | (uint32_t)p[7] << 24;
        c = table[7][lo & 0xff] ^ table[6][(lo >> 8) & 0xff] ^ table[5][(lo >> 16) & 0xff] ^
            table[4][lo >> 24] ^ table[3][hi & 0xff] ^ table[2][(hi >> 8) & 0xff] ^
            table[1][(hi >> 16) & 0xff] ^ table[0][hi >> 24];
        p += 8;
        len -= 8;
    }
    while (len--)
        c = table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
    return ~c;
}

/* ---------------------------------------------------------------- SSE4.2 */

#ifdef FM_CRC_X86
static inline uint64_t load64(const unsigned char *p)
{
    uint64_t w;
    memcpy(&w, p, 8); /* unaligned-safe; a single mov at -O2 */
    return w;
}

static inline uint32_t shift_crc(uint32_t tab[4][256], uint32_t crc)
{
    return tab[0][crc & 0xff] ^ tab[1][(crc >> 8) & 0xff] ^ tab[2][(crc >> 16) & 0xff] ^ tab[3][crc >> 24];
}

__attribute__((target("sse4.2")))
static uint32_t crc32c_sse42(uint32_t crc, const void *buf, size_t len)
{
    const unsigned char *p = (const unsigned char *)buf;
    uint64_t c0 = (uint32_t)~crc;

    while (len && ((uintptr_t)p & 7)) {
        c0 = _mm_crc32_u8((uint32_t)c0, *p++);
        len--;
    }
    while (len >= 3 * LONG_BLOCK) {
        uint64_t c1 = 0, c2 = 0;
        const unsigned char *end = p + LONG_BLOCK;
        do {
            c0 = _mm_crc32_u64(c0, load64(p));
            c1 = _mm_crc32_u64(c1, load64(p + LONG_BLOCK));
            c2 = _mm_crc32_u64(c2, load64(p + 2 * LONG_BLOCK));
            p += 8;
        } while (p < end);
        c0 = shift_crc(shift_long, (uint32_t)c0) ^ (uint32_t)c1;
        c0 = shift_crc(shift_long, (uint32_t)c0) ^ (uint32_t)c2;
        p += 2 * LONG_BLOCK;
        len -= 3 * LONG_BLOCK;
    }
    while (len >= 3 * SHORT_BLOCK) {
        uint64_t c1 = 0, c2 = 0;
        const unsigned char *end = p + SHORT_BLOCK;
        do {
            c0 = _mm_crc32_u64(c0, load64(p));
            c1 = _mm_crc32_u64(c1, load64(p + SHORT_BLOCK));
            c2 = _mm_crc32_u64(c2, load64(p + 2 * SHORT_BLOCK));
            p += 8;
        } while (p < end);
        c0 = shift_crc(shift_short, (uint32_t)c0) ^ (uint32_t)c1;
        c0 = shift_crc(shift_short, (uint32_t)c0) ^ (uint32_t)c2;
        p += 2 * SHORT_BLOCK;
        len -= 3 * SHORT_BLOCK;
    }
    while (len >= 8) {
        c0 = _mm_crc32_u64(c0, load64(p));
        p += 8;
        len -= 8;
    }
    while (len) {
        c0 = _mm_crc32_u8((uint32_t)c0, *p++);
        len--;
    }
    return ~(uint32_t)c0;
}
#endif

/* ---------------------------------------------------------------- public */

uint32_t fm_crc32c(uint32_t crc, const void *buf, size_t len)
{
    if (len == 0)
        return crc;
    ensure_init();
    return crc_impl(crc, buf, len);
}

uint32_t fm_crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b)
{
    if (len_b == 0)
        return crc_a;
    ensure_init();
    return multmodp(x2nmodp(len_b, 3), crc_a) ^ crc_b;
}

const char *fm_crc32c_impl(void)
{
    ensure_init();
    return crc_impl_name;
}
