"""The native expert reader and CRC-32C (flashmoe_plugin._io, csrc/cpu/fm_io.c + crc32c.c).

Oracles: the `crc32c` PyPI package for checksums, plain Python file reads for the bytes.
"""
from __future__ import annotations

import gc
import pickle
import random
import threading

import numpy as np
import pytest

from flashmoe_plugin import _io
from flashmoe_plugin.io import (AlignedBuffer, ChecksumError, ReadError, Reader, aligned_empty,
                                crc32c, crc32c_combine, crc32c_ptr)

try:  # the oracle: the `crc32c` package (test extra); a plain table implementation otherwise
    from crc32c import crc32c as crc32c_ref
except ImportError:  # pragma: no cover - offline machines without the package
    _TABLE = []
    for _n in range(256):
        _c = _n
        for _ in range(8):
            _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
        _TABLE.append(_c)

    def crc32c_ref(data, crc=0):
        crc ^= 0xFFFFFFFF
        for b in bytes(data):
            crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
        return crc ^ 0xFFFFFFFF

REC = 4096
SIZES = [0, 1, 7, 63, 64, 4095, 4096 + 3, 3 * 8192 + 5, 1 << 20]


# ------------------------------------------------------------------------------------ crc32c

@pytest.mark.parametrize("n", SIZES)
def test_crc32c_matches_reference(n):
    rnd = random.Random(n)
    data = rnd.randbytes(n)
    assert crc32c(data) == crc32c_ref(data)
    assert _io._crc32c_portable(data) == crc32c_ref(data)
    # unaligned starts exercise the head loops of both implementations
    for off in (1, 3, 7):
        if n > off:
            assert crc32c(memoryview(data)[off:]) == crc32c_ref(data[off:])


def test_crc32c_known_value_and_chaining():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    data = random.Random(1).randbytes(300_000)
    for cut in (0, 1, 4095, 100_000, 299_999, 300_000):
        a, b = data[:cut], data[cut:]
        assert crc32c(b, crc32c(a)) == crc32c_ref(data)
        assert crc32c_combine(crc32c(a), crc32c(b), len(b)) == crc32c_ref(data)
    assert crc32c(data[100:], crc32c_ref(data[:100])) == crc32c_ref(data)


def test_crc32c_accepts_buffers_and_tensors():
    torch = pytest.importorskip("torch")
    data = random.Random(2).randbytes(10_000)
    want = crc32c_ref(data)
    arr = np.frombuffer(data, dtype=np.uint8)
    assert crc32c(bytearray(data)) == want
    assert crc32c(memoryview(data)) == want
    assert crc32c(arr) == want
    assert crc32c(arr.view(np.float32)) == want
    assert crc32c(torch.frombuffer(bytearray(data), dtype=torch.uint8)) == want
    assert crc32c(torch.frombuffer(bytearray(data), dtype=torch.float32)) == want  # bytes, not values
    buf = AlignedBuffer(len(data))
    memoryview(buf)[:] = data
    assert crc32c(buf) == want
    assert crc32c_ptr(buf.address, len(data)) == want
    assert crc32c_ptr(buf.address + 10, 100, crc32c(data[:10])) == crc32c_ref(data[:110])
    with pytest.raises(TypeError):
        crc32c("text")
    with pytest.raises(BufferError):
        crc32c(arr[::2])
    with pytest.raises(BufferError):
        crc32c(torch.zeros(4, 4, dtype=torch.uint8).t())


# ----------------------------------------------------------------------------- AlignedBuffer

@pytest.mark.parametrize("nbytes,align", [(0, 4096), (1, 4096), (5 * 4096 + 1, 4096), (100, 64), (8192, 1 << 16)])
def test_aligned_buffer(nbytes, align):
    buf = AlignedBuffer(nbytes, align)
    assert buf.nbytes == len(buf) == nbytes and buf.align == align
    assert buf.address % align == 0
    mv = memoryview(buf)
    assert mv.nbytes == nbytes and not mv.readonly and mv.format == "B" and mv.c_contiguous
    if nbytes:
        mv[-1] = 7
        assert np.frombuffer(buf, dtype=np.uint8)[-1] == 7


def test_aligned_buffer_zero_copy_torch():
    torch = pytest.importorskip("torch")
    buf = AlignedBuffer(3 * 4096, zero=True)
    t = torch.frombuffer(buf, dtype=torch.uint8)
    assert t.data_ptr() == buf.address and t.numel() == buf.nbytes and int(t.sum()) == 0
    memoryview(buf)[5] = 9
    assert int(t[5]) == 9
    del buf
    gc.collect()
    t[6] = 1  # the tensor keeps the memory alive
    assert int(t[5]) == 9
    e = aligned_empty(8192)
    assert e.data_ptr() % 4096 == 0 and e.numel() == 8192 and e.dtype == torch.uint8


def test_aligned_buffer_bad_args():
    with pytest.raises(ValueError):
        AlignedBuffer(10, 3)
    with pytest.raises(ValueError):
        AlignedBuffer(-1)


# ------------------------------------------------------------------------------------ Reader

@pytest.fixture(scope="module")
def store_file(tmp_path_factory):
    """A file of 64 random 'records' of 1..4 pages each, like an expert layer file."""
    rnd = random.Random(3)
    path = tmp_path_factory.mktemp("io") / "layer_000.bin"
    data = rnd.randbytes(64 * 4 * REC)
    path.write_bytes(data)
    return path, data


def random_records(data, n, rnd, aligned=True):
    out = []
    for _ in range(n):
        if aligned:
            npages = rnd.randint(1, 16)
            off = rnd.randrange(0, len(data) // REC - npages + 1) * REC
            size = npages * REC
        else:
            size = rnd.randint(0, 70_000)
            off = rnd.randrange(0, len(data) - size + 1)
        out.append((off, size))
    return out


def open_or_skip(reader, path, direct):
    fid = reader.open(path, direct=direct)
    if direct and not reader.is_direct(fid):
        pytest.skip(f"the filesystem of {path} refuses O_DIRECT (opened buffered instead)")
    return fid


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
@pytest.mark.parametrize("mode", ["batch", "async"])
def test_reads_match_python(store_file, direct, mode):
    path, data = store_file
    rnd = random.Random(4)
    with Reader(nthreads=4, direct=direct, chunk_bytes=3 * REC) as reader:
        fid = open_or_skip(reader, path, None)
        assert reader.is_direct(fid) == direct and reader.direct == direct
        assert reader.file_size(fid) == len(data) and reader.path(fid) == str(path)
        recs = random_records(data, 40, rnd)
        total = sum(n for _, n in recs)
        pool = AlignedBuffer(total)
        reqs, pos = [], 0
        for i, (off, n) in enumerate(recs):
            reqs.append((fid, off, n, pool.address + pos, crc32c_ref(data[off:off + n]) if i % 2 else None))
            pos += n
        if mode == "batch":
            reader.read(reqs)
        else:
            ticket = reader.submit(reqs, priority=1)
            assert len(ticket) == len(reqs)
            reader.wait(ticket)
            assert reader.done(ticket) and ticket.done()
            assert ticket.status() == ["ok"] * len(reqs) and ticket.errors() == []
            crcs = ticket.crcs()
            assert crcs[1] == reqs[1][4] and crcs[0] is None
        got = bytes(memoryview(pool))
        pos = 0
        with open(path, "rb") as f:
            for off, n in recs:
                f.seek(off)
                assert got[pos:pos + n] == f.read(n)
                pos += n


def test_unaligned_buffered_reads_and_dest_kinds(store_file):
    torch = pytest.importorskip("torch")
    path, data = store_file
    rnd = random.Random(5)
    with Reader(nthreads=3, chunk_bytes=8192) as reader:
        fid = reader.open(path)
        recs = random_records(data, 30, rnd, aligned=False)
        dests = []
        for i, (off, n) in enumerate(recs):
            kind = i % 4
            dests.append(bytearray(n) if kind == 0 else np.empty(n, np.uint8) if kind == 1
                         else torch.empty(n, dtype=torch.uint8) if kind == 2
                         else memoryview(bytearray(n + 10))[5:5 + n])
        reader.read([(fid, off, n, d, crc32c_ref(data[off:off + n])) for (off, n), d in zip(recs, dests)])
        for (off, n), d in zip(recs, dests):
            b = d.numpy().tobytes() if hasattr(d, "numpy") and not isinstance(d, np.ndarray) else bytes(d)
            assert b == data[off:off + n]
        with pytest.raises(ValueError, match="dest holds 10 bytes"):
            reader.read([(fid, 0, 11, bytearray(10), None)])
        with pytest.raises(TypeError, match="read-only"):
            reader.read([(fid, 0, 10, b"0123456789", None)])
        with pytest.raises(TypeError, match="request 0"):
            reader.read([(fid, 0, 10)])
        with pytest.raises(ValueError, match="unknown or closed file id 99"):
            reader.read([(99, 0, 10, bytearray(10), None)])


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "no_such_dir" / "layer_007.bin"
    with Reader(nthreads=1) as reader:
        with pytest.raises(FileNotFoundError) as ei:
            reader.open(missing)
        assert str(missing) in str(ei.value)
        with pytest.raises(IsADirectoryError):
            reader.open(tmp_path)


def test_read_past_eof_names_offset(store_file):
    path, data = store_file
    size = len(data)
    with Reader(nthreads=2, chunk_bytes=REC) as reader:
        fid = reader.open(path)
        buf = AlignedBuffer(8 * REC)
        ok = (fid, 0, REC, buf.address, None)
        bad = (fid, size - REC, 4 * REC, buf.address + REC, None)
        with pytest.raises(ReadError) as ei:
            reader.read([ok, bad, ok])
        e = ei.value
        assert isinstance(e, OSError) and not isinstance(e, ChecksumError)
        assert e.kind == "short" and e.index == 1 and e.path == str(path)
        assert e.offset == size - REC and e.nbytes == 4 * REC and e.file_end == size
        msg = str(e)
        assert str(path) in msg and str(size - REC) in msg and str(size) in msg and "end of file" in msg
        # entirely past the end: still the file's real size
        with pytest.raises(ReadError) as ei:
            reader.read([(fid, size + 10 * REC, REC, buf.address, None)])
        assert ei.value.kind == "short" and ei.value.file_end == size


def test_checksum_mismatch(store_file):
    path, data = store_file
    with Reader(nthreads=2, chunk_bytes=REC) as reader:
        fid = reader.open(path)
        buf = AlignedBuffer(16 * REC)
        good = [crc32c_ref(data[i * 3 * REC:(i + 1) * 3 * REC]) for i in range(4)]
        reqs = [(fid, i * 3 * REC, 3 * REC, buf.address + i * 3 * REC, good[i]) for i in range(4)]
        reqs[2] = reqs[2][:4] + (good[2] ^ 0x10,)
        with pytest.raises(ChecksumError) as ei:
            reader.read(reqs)
        e = ei.value
        assert isinstance(e, ReadError) and e.kind == "checksum" and e.index == 2
        assert e.expected_crc == good[2] ^ 0x10 and e.actual_crc == good[2]
        assert e.offset == 6 * REC and str(path) in str(e) and f"{good[2]:08x}" in str(e)
        ticket = reader.submit(reqs)
        with pytest.raises(ChecksumError):
            ticket.wait()
        assert [x.index for x in ticket.errors()] == [2]
        assert ticket.status() == ["ok", "ok", "checksum", "ok"]
        e2 = pickle.loads(pickle.dumps(e))
        assert type(e2) is ChecksumError and e2.index == 2 and str(e2) == str(e)


def test_direct_misaligned_refused(store_file):
    path, _ = store_file
    with Reader(nthreads=2, direct=True) as reader:
        fid = open_or_skip(reader, path, True)
        buf = AlignedBuffer(4 * REC)
        ok = (fid, 0, REC, buf.address, None)
        for i, bad in enumerate([(fid, 512, REC, buf.address, None),
                                 (fid, 0, REC + 1, buf.address, None),
                                 (fid, 0, REC, buf.address + 8, None)]):
            with pytest.raises(ReadError) as ei:
                reader.submit([ok, ok, bad])
            e = ei.value
            assert e.kind == "align" and e.index == 2 and e.errno == 22
            assert "4096" in str(e) and "O_DIRECT" in str(e) and str(path) in str(e)
        buffered = reader.open(path, direct=False)  # the same request is fine buffered
        reader.read([(buffered, 512, REC + 1, buf.address + 8, None)])


def test_zero_threads_cancel_and_close(store_file):
    path, data = store_file
    reader = Reader(nthreads=0)
    fid = reader.open(path)
    buf = AlignedBuffer(4 * REC)
    reqs = [(fid, i * REC, REC, buf.address + i * REC, None) for i in range(4)]
    t = reader.submit(reqs)
    assert not t.done()  # no threads: nothing runs until someone waits
    with pytest.raises(OSError):
        reader.close_file(fid)  # busy
    assert t.cancel() == 4
    with pytest.raises(ReadError, match="cancelled"):
        t.wait()  # a cancelled read was not read
    assert t.status() == ["cancelled"] * 4 and [e.kind for e in t.errors()] == ["cancelled"] * 4
    t2 = reader.submit(reqs)
    t2.wait()
    assert bytes(memoryview(buf)) == data[:4 * REC]
    assert t2.cancel() == 0
    reader.close_file(fid)
    with pytest.raises(ValueError):
        reader.close_file(fid)
    reader.evict(reader.open(path))
    t3 = reader.submit([(reader.open(path), 0, REC, bytearray(REC), None)])
    reader.close()  # drains t3
    assert t3.done() and reader.closed
    reader.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        reader.open(path)
    assert reader.submit.__doc__


def test_empty_batch_and_zero_length(store_file):
    path, data = store_file
    with Reader() as reader:
        fid = reader.open(path)
        reader.read([])
        assert reader.submit([]).done()
        reader.read([(fid, 5, 0, 0, 0)])  # zero bytes, crc of nothing is 0


def test_stress_many_threads_and_requests(store_file):
    path, data = store_file
    rnd = random.Random(6)
    with Reader(nthreads=16, chunk_bytes=REC) as reader:
        fid = reader.open(path)
        tickets = []
        for k in range(8):
            recs = random_records(data, 250, rnd, aligned=False)
            dests = [bytearray(n) for _, n in recs]
            reqs = [(fid, off, n, d, crc32c_ref(data[off:off + n])) for (off, n), d in zip(recs, dests)]
            tickets.append((reader.submit(reqs, priority=k % 3), recs, dests))
        errors = []

        def worker(seed):
            try:
                r2 = random.Random(seed)
                for _ in range(5):
                    recs = random_records(data, 50, r2, aligned=False)
                    dests = [bytearray(n) for _, n in recs]
                    reader.read([(fid, off, n, d, None) for (off, n), d in zip(recs, dests)])
                    assert all(bytes(d) == data[o:o + n] for (o, n), d in zip(recs, dests))
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
        for th in threads:
            th.start()
        for t, recs, dests in reversed(tickets):
            t.wait()
            assert all(bytes(d) == data[o:o + n] for (o, n), d in zip(recs, dests))
        for th in threads:
            th.join()
        assert not errors, errors
