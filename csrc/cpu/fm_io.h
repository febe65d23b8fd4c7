/* fm_io: the expert reader. A pool of POSIX threads executing batches of positional reads
 * (pread) from open files into caller-owned memory, optionally verifying a CRC-32C per request.
 * No Python here; cython/_io.pyx wraps it.
 *
 * Model
 *   - A reader owns N worker threads and a table of open files (buffered or O_DIRECT).
 *   - A batch is an array of requests {file, offset, nbytes, dest, expected crc?}. Requests larger
 *     than the reader's chunk size are split into chunks that run on different threads (more reads
 *     in flight for the SSD); per-chunk CRCs are merged with fm_crc32c_combine.
 *   - fm_submit() queues a batch and returns at once; fm_wait() blocks until it is complete, and the
 *     waiting thread executes unclaimed work of that batch itself (so a reader with 0 threads works,
 *     synchronously). Higher `priority` batches are served first (demand reads before prefetch).
 *   - Every request gets a result: FM_OK or the precise failure (errno and the failing file offset,
 *     a read past end of file, or a checksum mismatch with both values).
 *   - O_DIRECT files require dest, offset and nbytes to be multiples of FM_DIRECT_ALIGN; fm_submit
 *     refuses a batch that breaks this (before any I/O) and names the request.
 *
 * Thread safety: all functions may be called from any thread, except that a batch must not be
 * waited on or freed concurrently with fm_batch_free() of the same batch, and fm_reader_free() must
 * not race with calls on the reader itself (fm_submit, fm_open, ...): use fm_reader_close() for a
 * shutdown from another thread. Every batch keeps the reader's memory alive, so waiting on or
 * freeing a batch is safe at any time, also during or after fm_reader_close/fm_reader_free.
 * Destination memory must stay valid until the batch is complete (fm_wait / fm_poll returned done).
 *
 * fork(): a child process gets a copy of the reader but none of its threads. There fm_submit
 * returns -ECHILD, waits never block (an incomplete batch stays incomplete: fm_wait returns its
 * size, fm_wait_timeout 0), and fm_batch_free / fm_reader_free release memory without waiting.
 */
#ifndef FM_IO_H
#define FM_IO_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FM_DIRECT_ALIGN 4096

/* request flags */
#define FM_REQ_VERIFY 1u /* compute the CRC-32C of the bytes read and compare it with `crc` */

/* result status */
enum {
    FM_OK = 0,
    FM_ERR_OS = 1,        /* pread failed: err = errno, err_offset = file offset of that pread */
    FM_ERR_SHORT = 2,     /* end of file before nbytes: err_offset = where the file ended */
    FM_ERR_CHECKSUM = 3,  /* crc = actual CRC-32C, expected in the request */
    FM_ERR_CANCELLED = 4, /* fm_cancel() dropped the request before (all of) it was read */
};

typedef struct fm_request {
    int32_t file;    /* id from fm_open */
    uint32_t flags;  /* FM_REQ_* */
    uint64_t offset; /* file offset */
    uint64_t nbytes;
    void *dest;      /* nbytes of writable memory */
    uint32_t crc;    /* expected CRC-32C when flags & FM_REQ_VERIFY */
} fm_request;

typedef struct fm_result {
    int32_t status;      /* FM_OK / FM_ERR_* */
    int32_t err;         /* errno for FM_ERR_OS */
    uint64_t err_offset; /* FM_ERR_OS: offset of the failing pread; FM_ERR_SHORT: end of file */
    uint32_t crc;        /* actual CRC-32C of the bytes (valid when verified) */
} fm_result;

typedef struct fm_reader fm_reader;
typedef struct fm_batch fm_batch;

/* nthreads >= 0 workers (0: all work is done by the thread calling fm_wait). chunk_bytes: requests
 * larger than this are split (rounded up to FM_DIRECT_ALIGN; 0 = never split). direct: default mode
 * of fm_open. Returns NULL with errno set on failure. */
fm_reader *fm_reader_new(int nthreads, int direct, uint64_t chunk_bytes);
/* Shuts the reader down: from now on fm_submit and fm_open return -ESHUTDOWN; waits for every
 * submitted batch to complete, stops the threads, closes the files. Idempotent; may be called from
 * any thread while others submit or wait. The memory stays until fm_reader_free. */
void fm_reader_close(fm_reader *r);
/* fm_reader_close, then drops the owner's hold on the memory, which is freed when the last batch
 * is released too. Batches must still be released with fm_batch_free (allowed after this). */
void fm_reader_free(fm_reader *r);
int fm_reader_nthreads(const fm_reader *r);
uint64_t fm_reader_chunk_bytes(const fm_reader *r);

/* Opens path read-only. direct: 1 = O_DIRECT (F_NOCACHE on macOS), 0 = buffered, -1 = reader
 * default. If the filesystem refuses O_DIRECT (EINVAL), the file is opened buffered instead and
 * *is_direct tells (may be NULL). Returns the file id (>= 0) or -errno. */
int fm_open(fm_reader *r, const char *path, int direct, int *is_direct);
/* Returns 0, -EBADF (no such id) or -EBUSY (a queued batch still reads it). */
int fm_close_file(fm_reader *r, int file);
/* O_DIRECT in effect: 1 / 0, or -EBADF. */
int fm_file_direct(fm_reader *r, int file);
/* File size in bytes, or -errno. */
int64_t fm_file_size(fm_reader *r, int file);
/* Asks the kernel to drop the file's cached pages (posix_fadvise DONTNEED): for cold-read
 * measurements. Returns 0 or -errno (-ENOSYS where unsupported). */
int fm_file_evict(fm_reader *r, int file);

/* Queues n requests (copied; the array may be reused at once). On success returns 0 and *out.
 * On a bad request nothing is queued: returns -EBADF (unknown file id), -EINVAL (O_DIRECT
 * misalignment, NULL dest, offset overflow, more than 2^32 chunks) or -ENOMEM, and *bad_index
 * names the request; -ESHUTDOWN after fm_reader_close, -ECHILD in a forked child. */
int fm_submit(fm_reader *r, const fm_request *reqs, size_t n, int priority, fm_batch **out, size_t *bad_index);
/* Blocks until the batch is complete (helping to execute it). Returns the number of failed
 * requests (including cancelled ones). */
size_t fm_wait(fm_batch *b);
/* Like fm_wait but gives up after timeout_ms (>= 0): returns 1 when complete, 0 on timeout. */
int fm_wait_timeout(fm_batch *b, int64_t timeout_ms);
/* 1 when complete, 0 otherwise; never blocks. */
int fm_poll(const fm_batch *b);
/* Drops the parts of the batch no thread has started; they complete as FM_ERR_CANCELLED. Reads in
 * progress finish. Returns the number of requests affected. fm_wait is still needed. */
size_t fm_cancel(fm_batch *b);
size_t fm_batch_size(const fm_batch *b);
/* Per-request results, valid once the batch is complete. */
const fm_result *fm_batch_results(const fm_batch *b);
/* Waits for completion if needed, then frees. */
void fm_batch_free(fm_batch *b);

/* Synchronous convenience: submit + wait + copy the results (results may be NULL). Returns the
 * number of failed requests, or a negative fm_submit error (with *bad_index). */
int64_t fm_read(fm_reader *r, const fm_request *reqs, size_t n, fm_result *results, size_t *bad_index);

/* Aligned memory for destinations (posix_memalign; align a power of two >= sizeof(void*)). nbytes 0
 * gives a valid unique pointer. NULL on failure. Free with fm_free_aligned. */
void *fm_alloc_aligned(size_t nbytes, size_t align);
void fm_free_aligned(void *p);

#ifdef __cplusplus
}
#endif

#endif /* FM_IO_H */
