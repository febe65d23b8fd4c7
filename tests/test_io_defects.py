"""Defects of the native reader, the kernels' bounds checks and the pager found by review (issue
16): each test failed before its fix. The C twins of the reader tests run under ASan/TSan in
tests/c/run.sh (test_native_io.py runs that script)."""
from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch

from flashmoe_plugin.io import AlignedBuffer, ReadError, Reader, crc32c, crc32c_combine
from flashmoe_plugin.store.format import Store, StoreError

DEMO = Path(__file__).parent.parent / "flashmoe_plugin" / "demo_model" / "store"
N = 1 << 20


@pytest.fixture
def data_file(tmp_path):
    data = os.urandom(N)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return path, data


# 1. a ticket in a reference cycle keeps its destinations until its reads are done
def test_ticket_in_a_cycle_keeps_its_destinations_until_read(data_file):
    path, data = data_file
    want = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    reader = Reader(nthreads=1, chunk_bytes=0)
    fid = reader.open(path)
    # the one thread is busy with this for a while, so the cycles below are collected mid-read
    sink = AlignedBuffer(N)
    blocker = reader.submit([(fid, 0, N, sink, None)] * 4096)
    seen = []
    for shape in range(5):
        base = torch.zeros(N, dtype=torch.uint8)  # outlives the cycle: we can look at it after
        dest = base[:]
        if shape == 4:  # make the collector meet the ticket before the tensor: older in its list
            gc.freeze()
        t = reader.submit([(fid, 0, N, dest, None)])
        if shape == 4:
            gc.collect()
            gc.unfreeze()
        if shape in (0, 4):
            dest.ticket = t              # dest -> ticket -> destinations -> dest
        elif shape == 1:
            dest.box = [t]               # through a list made after the ticket
        elif shape == 2:
            box = {"t": t}
            box["self"] = box
            dest.box = box
        else:
            dest.ticket = (t, dest)      # through a tuple (which has no tp_clear)
        weakref.finalize(dest, lambda b=base: seen.append(torch.equal(b, want)))
        del dest, t
        box = None
        gc.collect()
    blocker.wait()
    deadline = time.monotonic() + 30
    while len(seen) < 5 and time.monotonic() < deadline:  # collected once their reads are done
        time.sleep(0.01)
        gc.collect()
    reader.close()
    assert seen == [True] * 5, "a destination was released before the read into it was done"


# 2. closing a reader while other threads wait on its batches
def test_close_while_other_threads_wait(data_file):
    path, data = data_file
    for nthreads in (0, 1, 4):
        reader = Reader(nthreads=nthreads, chunk_bytes=4096)
        fid = reader.open(path)
        bufs = [bytearray(N) for _ in range(4)]
        tickets = [reader.submit([(fid, 0, N, b, crc32c(data))]) for b in bufs]
        errors = []

        def wait(t):
            try:
                t.wait()
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)
        threads = [threading.Thread(target=wait, args=(t,)) for t in tickets]
        for th in threads:
            th.start()
        reader.close()
        for th in threads:
            th.join()
        assert not errors and all(bytes(b) == data for b in bufs)
        with pytest.raises(ValueError, match="closed"):
            reader.submit([(fid, 0, 1, bytearray(1), None)])
        del tickets, reader
        gc.collect()


def test_close_races_with_submit(data_file):
    path, data = data_file
    reader = Reader(nthreads=2)
    fid = reader.open(path)
    outcomes = []

    def submit_loop():
        try:
            while True:
                reader.read([(fid, 0, 4096, bytearray(4096), None)])
        except ValueError as e:
            outcomes.append(str(e))
    th = threading.Thread(target=submit_loop)
    th.start()
    time.sleep(0.05)
    reader.close()
    th.join(10)
    assert outcomes == ["Reader is closed"]


# 3. a crafted batch whose chunk count wraps
def test_submit_whose_chunk_count_wraps_is_refused(data_file):
    path, _ = data_file
    with Reader(nthreads=0, chunk_bytes=4096) as reader:
        fid = reader.open(path)
        huge = (fid, 0, 2**63 - 1, 1, None)  # 2^51 chunks each: 8192 of them sum to 2^64
        with pytest.raises(ReadError, match="out of range") as ei:
            reader.submit([huge] * 8192)
        assert ei.value.index == 0


# 4. crc32c_combine for len_b >= 512 MiB, against a direct CRC over more than 1 GiB
def test_crc32c_combine_beyond_512_mib():
    block = torch.randint(0, 256, (64 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    a = crc32c(block[:1000])
    direct, b = a, 0
    for k in range(1, 18):  # 64 MiB .. 1088 MiB
        direct, b = crc32c(block, direct), crc32c(block, b)
        if k in (8, 9, 16, 17):
            assert crc32c_combine(a, b, k * block.numel()) == direct, f"{k * 64} MiB"


# 5. the kernels' bounds check must not overflow
def test_dequantize_offset_near_int64_max_is_refused():
    k = pytest.importorskip("flashmoe_plugin._cpu_kernels")
    part = torch.zeros(1 << 16, dtype=torch.uint8)
    for off in (2**63 - 16, 2**63 - 1, 2**62):
        with pytest.raises(ValueError, match="too short"):
            k.dequantize(part, "q4", (64, 64), offset=off)
        with pytest.raises(ValueError, match="too short"):
            k.linear(torch.zeros(64), part, "q4", (64, 64), offset=off)


# 6. the CUDA twin of part_sections has the C version's overflow guard (a host function: no GPU)
def test_cuda_part_nbytes_refuses_overflowing_shapes():
    k = pytest.importorskip("flashmoe_plugin._kernels_cuda", reason="flashmoe_plugin._kernels_cuda not built")
    from flashmoe_plugin import _cpu_kernels as c
    for shape in ((2**30, 2**30), (2**33, 2**16), (2**40, 64)):
        with pytest.raises(ValueError):
            c.part_nbytes("q8", *shape)
        with pytest.raises(ValueError):
            k.part_nbytes("q8", *shape)
    assert k.part_nbytes("q4", 128, 256) == c.part_nbytes("q4", 128, 256)


# 7. a cancelled read is not a success
def test_cancelled_read_raises(data_file):
    path, _ = data_file
    with Reader(nthreads=0) as reader:
        t = reader.submit([(reader.open(path), 0, N, bytearray(N), None)])
        assert t.cancel() == 1
        with pytest.raises(ReadError, match="cancelled") as ei:
            t.wait()
        assert ei.value.kind == "cancelled"


def _pager(**kw):
    from flashmoe_plugin.pager.pager import ExpertPager
    return ExpertPager(Store.open(DEMO), io_threads=0, **kw)


def test_pager_closed_mid_request_does_not_install_unread_records():
    for host_budget in (0, None):
        p = _pager(host_budget=host_budget if host_budget is not None else 10 * (1 << 20))
        batch = p.request(0, [0, 1])  # demand reads queued; no thread runs them
        for r in p.reads.values():    # what close() from another thread does first
            r.ticket.cancel()
        with pytest.raises(StoreError, match="layer 0 expert 0.*cancelled"):
            list(batch)
        assert (0, 0) not in p.t0
        p.close()


# 8. tensors: the storage stays alive, writable is honoured; fork; interrupts in the pager
def test_tensor_destination_storage_outlives_set_(data_file):
    path, data = data_file
    with Reader(nthreads=0) as reader:
        dest = torch.zeros(N, dtype=torch.uint8)
        t = reader.submit([(reader.open(path), 0, N, dest, None)])
        storage = weakref.ref(dest.untyped_storage())
        dest.set_(torch.empty(0, dtype=torch.uint8))  # drops the tensor's hold on its storage
        gc.collect()
        kept = storage()
        assert kept is not None, "the destination's storage was freed mid-read"
        t.wait()
        assert torch.empty(0, dtype=torch.uint8).set_(kept).numpy().tobytes() == data
        with pytest.raises(TypeError, match="requires grad"):
            reader.submit([(0, 0, 4, torch.zeros(4, requires_grad=True), None)])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_neither_hangs_nor_submits(data_file):
    path, data = data_file
    reader = Reader(nthreads=1, chunk_bytes=0)
    fid = reader.open(path)
    bufs = [AlignedBuffer(N) for _ in range(32)]
    t = reader.submit([(fid, 0, N, b, None) for b in bufs])
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        code = 1
        try:
            signal.alarm(20)
            try:
                reader.submit([(fid, 0, 1, bytearray(1), None)])
            except OSError as e:
                code = 0 if "forked child" in str(e) else 2
            del t  # dropping an unfinished ticket must not block here
            reader.close()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    t.wait()
    assert all(bytes(b) == data for b in bufs)
    reader.close()


def test_keyboard_interrupt_in_finish_and_cancel_keeps_buffers():
    for host_budget in (0, 10 << 20):
        p = _pager(host_budget=host_budget)
        free_before = (len(p.staging_free) if p.tiered else None, set(p.t0.free))
        for op in ("finish", "cancel"):
            r = p._submit((1, 2), 1)
            p.reads.pop((1, 2))
            real_wait, r.ticket = r.ticket, _Interrupting(r.ticket)
            with pytest.raises(KeyboardInterrupt):
                p._finish(r) if op == "finish" else p._cancel(r)
            real_wait.status()  # the read is settled
            assert (len(p.staging_free) if p.tiered else None, set(p.t0.free)) == free_before, op
            assert (1, 2) not in p.t0
        p.close()


class _Interrupting:
    """A ticket whose wait() is interrupted by Ctrl-C (after cancelling, as Ticket does)."""

    def __init__(self, ticket):
        self.t = ticket

    def cancel(self):
        return self.t.cancel()

    def done(self):
        return self.t.done()

    def wait(self):
        self.t.cancel()
        raise KeyboardInterrupt


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_c_reader_under_asan_ubsan_and_tsan():
    """tests/c/test_fm_io.c (the C twins of the tests above, and more) under the sanitizers."""
    root = Path(__file__).parent.parent
    run = subprocess.run(["sh", str(root / "tests" / "c" / "run.sh")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("all ok") == 2
