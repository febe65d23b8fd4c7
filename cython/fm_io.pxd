# C declarations of csrc/cpu/fm_io.h and csrc/cpu/crc32c.h. cython/_io.pyx cimports them; any other
# .pyx in cython/ may too (`from fm_io cimport fm_crc32c`) and then lists csrc/cpu/crc32c.c (etc.)
# in its own `# distutils: sources`.
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t


cdef extern from "crc32c.h" nogil:
    uint32_t fm_crc32c(uint32_t crc, const void *buf, size_t len)
    uint32_t fm_crc32c_portable(uint32_t crc, const void *buf, size_t len)
    uint32_t fm_crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b)
    const char *fm_crc32c_impl()


cdef extern from "fm_io.h" nogil:
    enum: FM_DIRECT_ALIGN
    enum: FM_REQ_VERIFY
    enum:
        FM_OK
        FM_ERR_OS
        FM_ERR_SHORT
        FM_ERR_CHECKSUM
        FM_ERR_CANCELLED

    ctypedef struct fm_request:
        int32_t file
        uint32_t flags
        uint64_t offset
        uint64_t nbytes
        void *dest
        uint32_t crc

    ctypedef struct fm_result:
        int32_t status
        int32_t err
        uint64_t err_offset
        uint32_t crc

    ctypedef struct fm_reader:
        pass
    ctypedef struct fm_batch:
        pass

    fm_reader *fm_reader_new(int nthreads, int direct, uint64_t chunk_bytes)
    void fm_reader_close(fm_reader *r)
    void fm_reader_free(fm_reader *r)
    int fm_reader_nthreads(const fm_reader *r)
    uint64_t fm_reader_chunk_bytes(const fm_reader *r)

    int fm_open(fm_reader *r, const char *path, int direct, int *is_direct)
    int fm_close_file(fm_reader *r, int file)
    int fm_file_direct(fm_reader *r, int file)
    int64_t fm_file_size(fm_reader *r, int file)
    int fm_file_evict(fm_reader *r, int file)

    int fm_submit(fm_reader *r, const fm_request *reqs, size_t n, int priority, fm_batch **out,
                  size_t *bad_index)
    size_t fm_wait(fm_batch *b)
    int fm_wait_timeout(fm_batch *b, int64_t timeout_ms)
    int fm_poll(const fm_batch *b)
    size_t fm_cancel(fm_batch *b)
    size_t fm_batch_size(const fm_batch *b)
    const fm_result *fm_batch_results(const fm_batch *b)
    void fm_batch_free(fm_batch *b)
    int64_t fm_read(fm_reader *r, const fm_request *reqs, size_t n, fm_result *results,
                    size_t *bad_index)

    void *fm_alloc_aligned(size_t nbytes, size_t align)
    void fm_free_aligned(void *p)
