# distutils: sources = csrc/cpu/fm_io.c csrc/cpu/crc32c.c
# distutils: include_dirs = csrc/cpu
# distutils: depends = csrc/cpu/fm_io.h csrc/cpu/crc32c.h
# cython: language_level=3, boundscheck=False, wraparound=False
"""flashmoe_plugin._io: the native expert reader and CRC-32C (csrc/cpu/fm_io.c, crc32c.c).

    crc32c(data, crc=0) -> int                 CRC-32C of any contiguous buffer (or CPU torch tensor)
    crc32c_ptr(address, nbytes, crc=0) -> int  same over raw memory
    crc32c_combine(crc_a, crc_b, len_b) -> int CRC of A+B from CRC(A), CRC(B), len(B)
    AlignedBuffer(nbytes, align=4096, zero=False)  writable, buffer protocol, .address/.nbytes
    Reader(nthreads=4, direct=False, chunk_bytes=1 MiB)  pread thread pool; batches of requests
    ReadError(OSError), ChecksumError(ReadError)

A request is a tuple (file_id, offset, nbytes, dest, expected_crc_or_None). dest is an int address
(the caller keeps that memory alive until the read completes) or a writable C-contiguous buffer
object (AlignedBuffer, memoryview slice, numpy array, bytearray) or a contiguous CPU torch tensor,
which the batch keeps alive until it completes. Parsing and queueing cost about 0.1 us per request
(measured here), far below the cost of any read, so there is no separate array-based entry point.
"""
from cpython.buffer cimport (PyBUF_FORMAT, PyBUF_ND, PyBUF_SIMPLE, PyBUF_STRIDES, PyBUF_WRITABLE,
                             PyBuffer_Release, PyObject_GetBuffer)
from cpython.buffer cimport PyObject_CheckBuffer
from cpython.exc cimport PyErr_CheckSignals
from cpython.ref cimport PyObject
from cpython.memoryview cimport PyMemoryView_FromObject, PyMemoryView_GET_BUFFER
from libc.errno cimport EBADF, ECHILD, EINVAL, errno
from libc.stdint cimport int64_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

from fm_io cimport *

cimport cython

import os as _os

cdef extern from "errno.h":
    enum: ESHUTDOWN

DIRECT_ALIGN = FM_DIRECT_ALIGN

cdef char *_FORMAT_B = b"B"
cdef size_t _NOGIL_CRC_BYTES = 1 << 16  # release the GIL when checksumming more than this


# ------------------------------------------------------------------------------------- errors

class ReadError(OSError):
    """A request of a batch failed. Attributes: index (position in the batch), kind ('os', 'short',
    'checksum', 'align', 'cancelled'), path, file_id, offset, nbytes, errno (for 'os' and 'align'),
    file_end ('short': the file's size), expected_crc / actual_crc ('checksum')."""

    def __init__(self, message, *, kind, index, path, file_id, offset, nbytes, errno=None,
                 file_end=None, expected_crc=None, actual_crc=None):
        if errno is not None:
            super().__init__(errno, message)
        else:
            super().__init__(message)
        self.message = message
        self.kind = kind
        self.index = index
        self.path = path
        self.file_id = file_id
        self.offset = offset
        self.nbytes = nbytes
        self.file_end = file_end
        self.expected_crc = expected_crc
        self.actual_crc = actual_crc

    def __str__(self):
        return self.message

    def __reduce__(self):
        return (_rebuild_error, (type(self), self.message, dict(
            kind=self.kind, index=self.index, path=self.path, file_id=self.file_id,
            offset=self.offset, nbytes=self.nbytes, errno=self.errno, file_end=self.file_end,
            expected_crc=self.expected_crc, actual_crc=self.actual_crc)))


class ChecksumError(ReadError):
    """The bytes read do not have the expected CRC-32C (a corrupt or stale record)."""


def _rebuild_error(cls, message, kw):
    return cls(message, **kw)


# ---------------------------------------------------------------------------------- checksums

cdef uint32_t _crc_of(object data, uint32_t crc, bint portable) except? 0xFFFFFFFF:
    cdef Py_buffer view
    cdef const char *p
    cdef size_t n
    if isinstance(data, str):
        raise TypeError("crc32c needs bytes-like data, not str (encode it first)")
    try:
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    except TypeError:
        addr, n = _tensor_span(data, writable=False)
        return _crc_span(<const char *><uintptr_t>addr, n, crc, portable)
    except (BufferError, ValueError) as e:  # numpy raises ValueError for non-contiguous arrays
        raise BufferError(f"crc32c needs contiguous memory: {e}") from None
    try:
        return _crc_span(<const char *>view.buf, <size_t>view.len, crc, portable)
    finally:
        PyBuffer_Release(&view)


cdef uint32_t _crc_span(const char *p, size_t n, uint32_t crc, bint portable) noexcept:
    if portable:
        if n > _NOGIL_CRC_BYTES:
            with nogil:
                crc = fm_crc32c_portable(crc, p, n)
        else:
            crc = fm_crc32c_portable(crc, p, n)
    elif n > _NOGIL_CRC_BYTES:
        with nogil:
            crc = fm_crc32c(crc, p, n)
    else:
        crc = fm_crc32c(crc, p, n)
    return crc


cdef tuple _tensor_span(object t, bint writable):
    """(address, nbytes) of a contiguous CPU torch tensor; TypeError for anything else. writable:
    the bytes will be written behind torch's back, which autograd must not be tracking."""
    if not hasattr(t, "data_ptr") or not hasattr(t, "is_contiguous"):
        raise TypeError(f"expected a buffer (bytes, memoryview, numpy array, AlignedBuffer) or a "
                        f"CPU torch tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise TypeError(f"expected host memory, got a tensor on {t.device}")
    if not t.is_contiguous():
        raise BufferError("tensor is not contiguous")
    if writable and t.requires_grad:
        raise TypeError("a tensor that requires grad cannot be a read destination (autograd would "
                        "not see the write): pass tensor.detach()")
    return int(t.data_ptr()), int(t.numel()) * int(t.element_size())


def crc32c(data, crc=0):
    """CRC-32C (Castagnoli) of a contiguous buffer, continuing from crc (chain calls to checksum
    pieces). Same values as the `crc32c` package's crc32c(data, value)."""
    return _crc_of(data, <uint32_t>(crc & 0xFFFFFFFF), False)


def crc32c_ptr(uintptr_t address, size_t nbytes, crc=0):
    """CRC-32C of nbytes of raw memory at address (the caller guarantees it is readable)."""
    if nbytes and not address:
        raise ValueError("crc32c_ptr: NULL address")
    return _crc_span(<const char *>address, nbytes, <uint32_t>(crc & 0xFFFFFFFF), False)


def crc32c_combine(crc_a, crc_b, uint64_t len_b):
    """CRC-32C of A followed by B, from crc32c(A), crc32c(B) and len(B)."""
    return fm_crc32c_combine(<uint32_t>(crc_a & 0xFFFFFFFF), <uint32_t>(crc_b & 0xFFFFFFFF), len_b)


def crc32c_impl():
    """Which implementation crc32c() uses on this CPU: 'sse4.2' or 'table'."""
    return fm_crc32c_impl().decode()


def _crc32c_portable(data, crc=0):
    """The portable table implementation (for tests of the fallback)."""
    return _crc_of(data, <uint32_t>(crc & 0xFFFFFFFF), True)


# ------------------------------------------------------------------------------ aligned memory

cdef class AlignedBuffer:
    """nbytes of memory aligned to `align` (posix_memalign), freed with the object. Supports the
    buffer protocol, writable: memoryview(buf), numpy.frombuffer(buf, numpy.uint8) and
    torch.frombuffer(buf, dtype=torch.uint8) share its memory (and keep it alive).
    zero=True fills it with zeros (which also faults every page in now rather than on first use)."""
    cdef void *_ptr
    cdef Py_ssize_t _n
    cdef size_t _align
    cdef Py_ssize_t _shape[1]
    cdef Py_ssize_t _strides[1]

    def __cinit__(self, Py_ssize_t nbytes, size_t align=4096, bint zero=False):
        if nbytes < 0:
            raise ValueError(f"AlignedBuffer: nbytes must be >= 0, got {nbytes}")
        if align < sizeof(void *) or (align & (align - 1)) != 0:
            raise ValueError(f"AlignedBuffer: align must be a power of two >= {sizeof(void *)}, "
                             f"got {align}")
        self._ptr = fm_alloc_aligned(<size_t>nbytes, align)
        if self._ptr == NULL:
            raise MemoryError(f"AlignedBuffer: cannot allocate {nbytes} bytes aligned to {align}")
        self._n = nbytes
        self._align = align
        self._shape[0] = nbytes
        self._strides[0] = 1
        if zero and nbytes:
            with nogil:
                memset(self._ptr, 0, <size_t>nbytes)

    def __dealloc__(self):
        if self._ptr != NULL:
            fm_free_aligned(self._ptr)
            self._ptr = NULL

    def __getbuffer__(self, Py_buffer *view, int flags):
        view.buf = self._ptr
        view.obj = self
        view.len = self._n
        view.readonly = 0
        view.itemsize = 1
        if flags & PyBUF_FORMAT:
            view.format = _FORMAT_B
        else:
            view.format = NULL
        view.ndim = 1
        view.shape = self._shape if (flags & PyBUF_ND) else NULL
        view.strides = self._strides if (flags & PyBUF_STRIDES) == PyBUF_STRIDES else NULL
        view.suboffsets = NULL
        view.internal = NULL

    def __releasebuffer__(self, Py_buffer *view):
        pass

    def __len__(self):
        return self._n

    @property
    def address(self):
        """Address of the first byte (an int)."""
        return <uintptr_t>self._ptr

    @property
    def nbytes(self):
        return self._n

    @property
    def align(self):
        return self._align

    def __repr__(self):
        return f"AlignedBuffer(nbytes={self._n}, align={self._align}, address=0x{<uintptr_t>self._ptr:x})"


# -------------------------------------------------------------------------------------- reader

cdef str _kind_name(int status):
    if status == FM_ERR_OS:
        return "os"
    if status == FM_ERR_SHORT:
        return "short"
    if status == FM_ERR_CHECKSUM:
        return "checksum"
    if status == FM_ERR_CANCELLED:
        return "cancelled"
    return "ok"


@cython.no_gc_clear
cdef class Ticket:
    """An asynchronous batch (Reader.submit). wait() blocks until every request is done (the GIL
    is released; the waiting thread also executes unstarted reads of this batch) and raises the
    first failure; done() polls; cancel() drops the reads no thread has started; status() and
    errors() report every request. Objects given as
    destinations are kept alive until the batch completes. Dropping an unfinished ticket waits
    for it. A KeyboardInterrupt during wait() cancels the rest of the batch."""
    cdef fm_batch *_b
    cdef fm_request *_reqs
    cdef size_t _n
    cdef Reader _reader
    cdef list _keep  # the destinations; hidden from the garbage collector while reads run

    def __dealloc__(self):
        if self._b != NULL:
            with nogil:
                fm_batch_free(self._b)
            self._b = NULL
        if self._reqs != NULL:
            free(self._reqs)
            self._reqs = NULL

    def __len__(self):
        return self._n

    cdef int _wait_nogil(self) except -1:
        cdef int done = 0
        if self._b == NULL:
            raise ValueError("Ticket objects come from Reader.submit()")
        try:
            while True:
                with nogil:
                    done = fm_wait_timeout(self._b, 200)
                if done:
                    break
                PyErr_CheckSignals()
        except BaseException:
            fm_cancel(self._b)
            with nogil:
                fm_wait(self._b)
            raise
        self._keep = None  # the batch is complete: release the destinations
        return 0

    def wait(self):
        """Block until the batch is complete; raise ReadError (ChecksumError) for the first failed
        request, a real failure before a cancellation: a request dropped by cancel() was not read,
        so it raises ReadError with kind 'cancelled' (status() tells them apart). Calling it again
        re-raises the same failure."""
        self._wait_nogil()
        cdef const fm_result *res = fm_batch_results(self._b)
        cdef size_t i
        cdef Py_ssize_t cancelled = -1
        for i in range(self._n):
            if res[i].status == FM_ERR_CANCELLED:
                if cancelled < 0:
                    cancelled = i
            elif res[i].status != FM_OK:
                raise self._error(i)
        if cancelled >= 0:
            raise self._error(cancelled)

    def done(self):
        """True when every request has completed (successfully or not). Never blocks."""
        return self._b != NULL and bool(fm_poll(self._b))

    def cancel(self):
        """Drop the reads no thread has started (reads in progress finish). Returns the number of
        requests affected; status() marks them 'cancelled' (their destination bytes are partly or
        wholly unwritten) and wait() raises for them. wait() (or status()) is still needed before
        reusing the destinations."""
        if self._b == NULL:
            return 0
        return fm_cancel(self._b)

    def errors(self):
        """Waits, then returns a ReadError for every request that was not read (failures and
        cancellations, in request order; empty when all is well)."""
        self._wait_nogil()
        cdef const fm_result *res = fm_batch_results(self._b)
        cdef size_t i
        return [self._error(i) for i in range(self._n) if res[i].status != FM_OK]

    def status(self):
        """Waits, then returns each request's outcome: 'ok', 'os', 'short', 'checksum' or
        'cancelled'."""
        self._wait_nogil()
        cdef const fm_result *res = fm_batch_results(self._b)
        cdef size_t i
        return [_kind_name(res[i].status) for i in range(self._n)]

    def crcs(self):
        """Waits, then returns the CRC-32C read for each request (None where not verified or
        failed). Useful to record checksums while reading."""
        self._wait_nogil()
        cdef const fm_result *res = fm_batch_results(self._b)
        cdef size_t i
        return [res[i].crc if (self._reqs[i].flags & FM_REQ_VERIFY) and
                (res[i].status == FM_OK or res[i].status == FM_ERR_CHECKSUM) else None
                for i in range(self._n)]

    cdef object _error(self, size_t i):
        cdef const fm_result *res = fm_batch_results(self._b)
        cdef const fm_request *q = &self._reqs[i]
        cdef int status = res[i].status
        path = self._reader._path_of(q.file)
        kind = _kind_name(status)
        where = f"{q.nbytes} bytes at offset {q.offset}"
        common = dict(kind=kind, index=i, path=path, file_id=q.file, offset=q.offset,
                      nbytes=q.nbytes)
        if status == FM_ERR_CHECKSUM:
            return ChecksumError(
                f"{path}: checksum mismatch reading {where} (request {i}): expected crc32c "
                f"0x{q.crc:08x}, got 0x{res[i].crc:08x}",
                expected_crc=q.crc, actual_crc=res[i].crc, **common)
        if status == FM_ERR_SHORT:
            return ReadError(
                f"{path}: read past end of file: request {i} wants {where} (up to byte "
                f"{q.offset + q.nbytes}) but the file ends at byte {res[i].err_offset}",
                file_end=res[i].err_offset, **common)
        if status == FM_ERR_OS:
            return ReadError(
                f"{path}: reading {where} failed at offset {res[i].err_offset} (request {i}): "
                f"{_os.strerror(res[i].err)}", errno=res[i].err, **common)
        return ReadError(f"{path}: read of {where} (request {i}) was cancelled", **common)


# A ticket in a reference cycle (dest -> ticket -> its destinations -> dest) must not have its
# destinations freed while reader threads still write into them. no_gc_clear keeps the collector
# from clearing the ticket, and while its batch runs the ticket shows the collector none of its
# references, so no cycle through it is found (nor any object in it cleared) before the reads are
# done; the next collection after that frees the cycle. (A never-waited batch of a reader without
# threads never completes: such a cycle stays.)
cdef extern from "Python.h":
    ctypedef int (*visitproc)(PyObject *, void *) noexcept
    ctypedef int (*traverseproc)(PyObject *, visitproc, void *) noexcept
    ctypedef struct _TypeSlots "PyTypeObject":
        traverseproc tp_traverse

cdef traverseproc _ticket_traverse_all = (<_TypeSlots *><void *>Ticket).tp_traverse


cdef int _ticket_traverse(PyObject *o, visitproc visit, void *arg) noexcept:
    cdef fm_batch *b = (<Ticket>o)._b
    if b != NULL and not fm_poll(b):
        return 0
    return _ticket_traverse_all(o, visit, arg)


(<_TypeSlots *><void *>Ticket).tp_traverse = _ticket_traverse


@cython.no_gc_clear
cdef class Reader:
    """A pool of nthreads reader threads (C, no GIL) executing batches of pread requests.

    Reader(nthreads=4, direct=False, chunk_bytes=1 << 20)
      direct: default for open(): O_DIRECT (page cache bypassed; offsets, sizes and destination
        addresses must then be multiples of 4096) or buffered.
      chunk_bytes: requests larger than this are split across threads (more reads in flight);
        0 never splits. Checksums are still per request.
      nthreads=0: no threads; reads run in the thread that calls read()/wait().

    open(path, direct=None) -> file id;  close_file(file_id);  close() (waits for queued batches).
    read(requests, priority=0): run a batch and wait; raises ReadError / ChecksumError.
    submit(requests, priority=0) -> Ticket; wait(ticket); done(ticket) -> bool.
    Higher priority batches are served first (demand reads before prefetches); FIFO otherwise.
    close() may be called from any thread while others submit or wait: their batches complete,
    later calls raise ValueError. The native memory lives until the Reader and its tickets are
    gone. After fork() a child cannot submit (OSError) and never blocks on the parent's batches."""
    cdef fm_reader *_r
    cdef bint _closed
    cdef list _paths
    cdef bint _direct
    cdef int _nthreads

    def __cinit__(self, int nthreads=4, bint direct=False, uint64_t chunk_bytes=1 << 20):
        if nthreads < 0:
            raise ValueError(f"Reader: nthreads must be >= 0, got {nthreads}")
        self._r = fm_reader_new(nthreads, direct, chunk_bytes)
        if self._r == NULL:
            e = errno
            raise OSError(e, f"Reader: cannot start {nthreads} reader threads: {_os.strerror(e)}")
        self._paths = []
        self._direct = direct
        self._nthreads = nthreads

    def __dealloc__(self):
        if self._r != NULL:
            with nogil:
                fm_reader_free(self._r)
            self._r = NULL

    cdef fm_reader *_get(self) except NULL:
        if self._r == NULL or self._closed:
            raise ValueError("Reader is closed")
        return self._r

    cdef object _path_of(self, int file_id):
        if 0 <= file_id < len(self._paths):
            return self._paths[file_id]
        return f"<file {file_id}>"

    def close(self):
        """Wait for every submitted batch, stop the threads and close all files. Idempotent; safe
        while other threads submit or wait (the memory is freed with the object, not here)."""
        cdef fm_reader *r = self._r
        self._closed = True
        if r != NULL:
            with nogil:
                fm_reader_close(r)

    @property
    def closed(self):
        return self._closed

    def __enter__(self):
        self._get()
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def nthreads(self):
        return self._nthreads

    @property
    def direct(self):
        """The default mode of open()."""
        return self._direct

    @property
    def chunk_bytes(self):
        return fm_reader_chunk_bytes(self._get())

    def open(self, path, direct=None):
        """Open a file for reading; returns its id. direct: None = the reader's default. If the
        filesystem refuses O_DIRECT the file is opened buffered: is_direct(id) tells."""
        cdef fm_reader *r = self._get()
        p = _os.fsdecode(_os.fspath(path))
        cdef bytes bpath = _os.fsencode(p)
        cdef const char *cpath = bpath
        cdef int want = -1 if direct is None else (1 if direct else 0)
        cdef int got = 0
        cdef int fid
        with nogil:
            fid = fm_open(r, cpath, want, &got)
        if fid == -ESHUTDOWN:
            raise ValueError("Reader is closed")
        if fid < 0:
            raise OSError(-fid, _os.strerror(-fid), p)
        while len(self._paths) <= fid:
            self._paths.append(None)
        self._paths[fid] = p
        return fid

    def close_file(self, int file_id):
        """Close one file (its id is not reused). Refused while a queued batch reads it."""
        cdef int rc = fm_close_file(self._get(), file_id)
        if rc == -EBADF:
            raise ValueError(f"unknown or closed file id {file_id}")
        if rc < 0:
            raise OSError(-rc, f"cannot close {self._path_of(file_id)}: batches still read it")

    def path(self, int file_id):
        """The path a file id was opened with."""
        return self._path_of(file_id)

    def is_direct(self, int file_id):
        """Whether O_DIRECT is in effect for that file."""
        cdef int rc = fm_file_direct(self._get(), file_id)
        if rc < 0:
            raise ValueError(f"unknown or closed file id {file_id}")
        return bool(rc)

    def file_size(self, int file_id):
        cdef int64_t rc = fm_file_size(self._get(), file_id)
        if rc == -EBADF:
            raise ValueError(f"unknown or closed file id {file_id}")
        if rc < 0:
            raise OSError(<int>-rc, _os.strerror(<int>-rc), self._path_of(file_id))
        return rc

    def evict(self, int file_id):
        """Drop the file's pages from the OS page cache (posix_fadvise DONTNEED), e.g. before a
        cold-read measurement. Dirty pages are not dropped."""
        cdef int rc = fm_file_evict(self._get(), file_id)
        if rc == -EBADF:
            raise ValueError(f"unknown or closed file id {file_id}")
        if rc < 0:
            raise OSError(-rc, _os.strerror(-rc), self._path_of(file_id))

    cdef Ticket _submit(self, requests, int priority):
        cdef fm_reader *r = self._get()
        cdef Ticket t = Ticket.__new__(Ticket)
        t._reader = self
        keep = t._keep = []
        reqs = requests if isinstance(requests, (list, tuple)) else list(requests)
        cdef size_t n = len(reqs)
        cdef size_t i
        cdef fm_request *q
        t._reqs = <fm_request *>malloc((n if n else 1) * sizeof(fm_request))
        if t._reqs == NULL:
            raise MemoryError()
        t._n = n
        for i in range(n):
            _parse_request(reqs[i], i, &t._reqs[i], keep)
        cdef size_t bad = 0
        cdef int rc
        with nogil:
            rc = fm_submit(r, t._reqs, n, priority, &t._b, &bad)
        if rc == 0:
            return t
        if rc == -ESHUTDOWN:
            raise ValueError("Reader is closed")
        if rc == -ECHILD:
            raise OSError(ECHILD, f"this Reader belongs to the process that created it, not to this "
                                  f"forked child (pid {_os.getpid()}): open a new Reader here")
        q = &t._reqs[bad]
        if rc == -EBADF:
            raise ValueError(f"request {bad}: unknown or closed file id {q.file}")
        path = self._path_of(q.file)
        if rc == -EINVAL:
            if q.nbytes and q.dest == NULL:
                msg = f"{path}: request {bad} has a NULL destination"
                raise ReadError(msg, kind="align", index=bad, path=path, file_id=q.file,
                                offset=q.offset, nbytes=q.nbytes, errno=EINVAL)
            if self.is_direct(q.file):
                msg = (f"{path}: request {bad} (offset {q.offset}, nbytes {q.nbytes}, dest "
                       f"0x{<uintptr_t>q.dest:x}) is not aligned to {FM_DIRECT_ALIGN} bytes, which "
                       f"O_DIRECT requires (use AlignedBuffer and 4096-aligned records, or open the "
                       f"file with direct=False)")
            else:
                msg = f"{path}: request {bad} (offset {q.offset}, nbytes {q.nbytes}) is out of range"
            raise ReadError(msg, kind="align", index=bad, path=path, file_id=q.file,
                            offset=q.offset, nbytes=q.nbytes, errno=EINVAL)
        raise OSError(-rc, f"cannot submit {n} read requests: {_os.strerror(-rc)}")

    def submit(self, requests, int priority=0):
        """Queue a batch; returns a Ticket at once. requests: iterable of
        (file_id, offset, nbytes, dest, expected_crc_or_None). Alignment (O_DIRECT) and file ids
        are checked here, before any I/O."""
        return self._submit(requests, priority)

    def read(self, requests, int priority=0):
        """Read a batch and wait for it (GIL released); raises ReadError / ChecksumError naming the
        first failed request (its .index) with the file path, offset and size."""
        cdef Ticket t = self._submit(requests, priority)
        t.wait()

    def wait(self, Ticket ticket):
        """Same as ticket.wait()."""
        ticket.wait()

    def done(self, Ticket ticket):
        """Same as ticket.done()."""
        return ticket.done()

    def __repr__(self):
        state = "closed" if self._r == NULL else f"{len(self._paths)} files"
        return f"Reader(nthreads={self._nthreads}, direct={self._direct}, {state})"


cdef int _parse_request(object rq, size_t i, fm_request *q, list keep) except -1:
    cdef tuple t
    cdef Py_ssize_t k
    cdef int64_t off, nb
    cdef Py_buffer *view
    if type(rq) is tuple:
        t = <tuple>rq
    else:
        try:
            t = tuple(rq)
        except TypeError:
            raise TypeError(f"request {i}: expected a tuple (file_id, offset, nbytes, dest, crc), "
                            f"got {type(rq).__name__}") from None
    k = len(t)
    if k != 5 and k != 4:
        raise TypeError(f"request {i}: expected (file_id, offset, nbytes, dest, crc), got {k} items")
    try:
        q.file = t[0]
        off = t[1]
        nb = t[2]
        crc = t[4] if k == 5 else None
        if crc is None:
            q.flags = 0
            q.crc = 0
        else:
            q.flags = FM_REQ_VERIFY
            q.crc = <uint32_t>(crc & 0xFFFFFFFF)
    except (TypeError, OverflowError) as e:
        raise type(e)(f"request {i}: {e}") from None
    if off < 0 or nb < 0:
        raise ValueError(f"request {i}: negative offset or size ({off}, {nb})")
    q.offset = <uint64_t>off
    q.nbytes = <uint64_t>nb
    dest = t[3]
    if isinstance(dest, int):
        try:
            q.dest = <void *><uintptr_t>dest
        except (TypeError, OverflowError) as e:
            raise type(e)(f"request {i}: bad dest address {dest!r}") from None
        return 0
    if hasattr(dest, "data_ptr") and not PyObject_CheckBuffer(dest):
        addr, size = _tensor_span(dest, writable=True)
        # the storage, not only the tensor: set_() or del of the tensor mid-read must not free it
        keep.append(dest.untyped_storage())
        keep.append(dest)
    else:
        try:
            mv = PyMemoryView_FromObject(dest)
        except TypeError as e:
            raise TypeError(f"request {i}: dest must be an int address, a writable contiguous "
                            f"buffer or a CPU torch tensor, got {type(dest).__name__}") from None
        view = PyMemoryView_GET_BUFFER(mv)
        if view.readonly:
            raise TypeError(f"request {i}: dest {type(dest).__name__} is read-only")
        if not mv.c_contiguous:
            raise BufferError(f"request {i}: dest is not C-contiguous")
        addr, size = <uintptr_t>view.buf, view.len
        # the memoryview holds the export until the batch completes, so the memory can neither be
        # freed nor moved (a bytearray cannot be resized while exported)
        keep.append(mv)
    if size < nb:
        raise ValueError(f"request {i}: dest holds {size} bytes, the request reads {nb}")
    q.dest = <void *><uintptr_t>addr
    return 0
