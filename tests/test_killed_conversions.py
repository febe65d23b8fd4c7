"""`convert` and `synth` killed with SIGKILL at several points never leave a DST that Store.open,
`inspect --verify` or Llama accept unless it is complete, and a rerun succeeds without any manual
cleanup (issue 16). The kill points are phases seen in the file system (the partial folder
exists, a layer file is being written, the dense file or the manifest exists) and fixed delays."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flashmoe_plugin.store.format import Store, StoreError

CLI = [sys.executable, "-c", "from flashmoe_plugin.cli import main; main()"]
# CI runs three phases per tool; FLASHMOE_LONG_TESTS=1 runs them all (reported in issue 16).
ALL_PHASES = ("partial", "experts/layer_000.bin", "experts/layer_001.bin", "dense.safetensors", "manifest.json",
              0.5, 1.5)
PHASES = ALL_PHASES if os.environ.get("FLASHMOE_LONG_TESTS") else ("partial", "experts/layer_001.bin", "manifest.json")


def killed_at(args, dst: Path, phase) -> int:
    """Start the command, SIGKILL it at `phase`; returns its exit status (negative: killed)."""
    p = subprocess.Popen(CLI + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while p.poll() is None and time.monotonic() - t0 < 120:
        if isinstance(phase, float):
            hit = time.monotonic() - t0 >= phase
        else:
            parts = list(dst.parent.glob(f".{dst.name}.partial-*"))
            hit = bool(parts) and (phase == "partial" or (parts[0] / phase).exists())
        if hit:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    return p.wait()


def accepted(dst: Path) -> bool:
    """Whether anything would take DST as a store; if so it must be the complete one."""
    try:
        store = Store.open(dst)
    except StoreError:
        return False
    assert store.verify() == [], "an incomplete store was accepted"
    run = subprocess.run(CLI + ["inspect", str(dst), "--verify"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return True


def check(args, dst: Path):
    outcomes = []
    for phase in PHASES:
        code = killed_at(args, dst, phase)
        done = accepted(dst)
        outcomes.append((phase, code, done))
        assert done or not dst.exists(), f"killed at {phase}: {dst} exists but is not a valid store"
        if not done and phase == PHASES[0]:
            run = subprocess.run(CLI + ["inspect", str(dst), "--verify"], capture_output=True, text=True, timeout=300)
            assert run.returncode != 0 and "Traceback" not in run.stderr
        # a rerun (no --force, no cleanup) finishes and leaves no partial folder behind
        if not done:
            rerun = subprocess.run(CLI + args, capture_output=True, text=True, timeout=600)
            assert rerun.returncode == 0, rerun.stderr[-2000:]
            assert accepted(dst)
        assert not list(dst.parent.glob(f".{dst.name}.partial-*")), os.listdir(dst.parent)
        shutil.rmtree(dst)
    assert any(code == -signal.SIGKILL for _, code, _ in outcomes), outcomes


def test_killed_synth(tmp_path):
    dst = tmp_path / "synth"
    check(["synth", "--like", "tiny", str(dst)], dst)


def test_killed_convert(oracles, tmp_path):
    dst = tmp_path / "conv"
    check(["convert", str(oracles("mixtral").hf_dir), str(dst), "--quant", "q4"], dst)
