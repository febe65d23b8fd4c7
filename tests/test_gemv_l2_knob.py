"""FLASHMOE_GEMV_L2 (kernels/cuda_backend.py): the decode GEMV's L2 prefetch knob, read from the
environment once per process and handed to the compiled module's gemv_tune("l2") the first time
the module is asked for; bad values are refused with the variable's name. The CPU side only (the
kernel's own test, bit-identical with the knob on: tests/test_cuda_gemv.py's
test_the_l2_prefetch_changes_no_bit, on a GPU)."""
from __future__ import annotations

import pytest

from flashmoe_plugin.kernels import cuda_backend


class _Module:
    """The compiled module's gemv_tune, recorded."""

    def __init__(self):
        self.calls = []

    def gemv_tune(self, key, value=None):
        self.calls.append((key, value))
        return 0


@pytest.mark.parametrize("value, bits", [("0", 0), ("1", 1), (" 3 ", 3), ("7", 7)])
def test_the_values_are_bits(value, bits):
    assert cuda_backend.gemv_l2_bits(value) == bits


@pytest.mark.parametrize("value", ["on", "8", "-1", "", "1.5"])
def test_a_bad_value_names_the_variable(value):
    with pytest.raises(ValueError, match="FLASHMOE_GEMV_L2"):
        cuda_backend.gemv_l2_bits(value)


def test_the_environment_reaches_the_knob_once(monkeypatch):
    mod = _Module()
    monkeypatch.setattr(cuda_backend, "compiled", lambda name: (mod, ""))
    monkeypatch.setattr(cuda_backend, "_l2_applied", False)
    monkeypatch.setenv("FLASHMOE_GEMV_L2", "5")
    assert cuda_backend.kernels() is mod and cuda_backend.kernels() is mod
    assert mod.calls == [("l2", 5)]  # once: a benchmark's later gemv_tune("l2", ...) stays
    monkeypatch.setattr(cuda_backend, "_l2_applied", False)
    monkeypatch.delenv("FLASHMOE_GEMV_L2")
    cuda_backend.kernels()
    assert mod.calls[-1] == ("l2", 0)  # unset: off, main's behaviour


def test_without_the_module_nothing_is_applied(monkeypatch):
    monkeypatch.setattr(cuda_backend, "compiled", lambda name: (None, "not built"))
    monkeypatch.setattr(cuda_backend, "_l2_applied", False)
    monkeypatch.setenv("FLASHMOE_GEMV_L2", "1")
    assert cuda_backend.kernels() is None
    assert cuda_backend._l2_applied is False
