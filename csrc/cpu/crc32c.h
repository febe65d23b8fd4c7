/* CRC-32C (Castagnoli, reflected polynomial 0x82F63B78): the per-record checksum of the expert
 * store (DESIGN.md section 6).
 *
 * Same convention as zlib's crc32() and the `crc32c` PyPI package: pass the CRC of everything before
 * `buf` (0 to start) and get the CRC of everything up to the end of `buf`, so
 * fm_crc32c(fm_crc32c(0, a, na), b, nb) == CRC of a followed by b.
 *
 * The fast path uses the SSE4.2 crc32 instruction on three interleaved streams, chosen at run time
 * (__builtin_cpu_supports), so the library is built without -msse4.2 / -march and still runs on any
 * x86-64. Everything else (other CPUs, other architectures) uses a portable slicing-by-8 table.
 * All functions are thread-safe; the tables are built once on first use.
 */
#ifndef FM_CRC32C_H
#define FM_CRC32C_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* CRC-32C of buf[0:len) continuing from `crc` (0 for a fresh checksum). buf may be NULL if len is 0. */
uint32_t fm_crc32c(uint32_t crc, const void *buf, size_t len);

/* The portable table implementation, always available (tests compare it with the fast path). */
uint32_t fm_crc32c_portable(uint32_t crc, const void *buf, size_t len);

/* CRC of A followed by B from crc_a = CRC(A), crc_b = CRC(B) and len_b = length of B. O(log len_b). */
uint32_t fm_crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);

/* Name of the implementation fm_crc32c() uses on this CPU: "sse4.2" or "table". */
const char *fm_crc32c_impl(void);

#ifdef __cplusplus
}
#endif

#endif /* FM_CRC32C_H */
