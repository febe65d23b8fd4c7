"""benchmarks/rival.py's pairs (--rounds): the median of the pairs' ratios, a pair as a `runs` entry,
the gate's exclusive locks, the disk's counters over a run and the O_DIRECT probe."""
import fcntl
import importlib.util
import os
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("rival", Path(__file__).parent.parent / "benchmarks" / "rival.py")
rival = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(rival)


def test_median_of_pairs():
    assert rival.median([]) is None
    assert rival.median([2.0, 0.9, 1.5]) == 1.5
    assert rival.median([2.0, 1.0, 1.5, 0.5]) == 1.25


def test_a_pair_in_the_runs_history_keeps_both_sides_and_the_first_run_load():
    pair = {"round": 1, "date": "d", "order": ["flashmoe", "llama"], "ratio_decode": 2.0,
            "llama": {"decode_tok_s": 1.0, "load_avg_1m_at_start": 3.0, "disk_probe_gbps_before": 0.5},
            "flashmoe": {"decode_tok_s": 2.0, "load_avg_1m_at_start": 1.0, "disk_probe_gbps_before": 0.7,
                         "stall_ms_per_token": 90.0}}
    h = rival.history(pair, "abc")
    assert h["llama_cpp_decode_tok_s"] == 1.0 and h["flashmoe_decode_tok_s"] == 2.0 and h["ratio_decode"] == 2.0
    assert h["load_avg_1m_at_start"] == 1.0  # flashmoe ran first in this round
    assert h["disk_probe_gbps_before"] == {"llama_cpp": 0.5, "flashmoe": 0.7}
    assert h["stall_ms_per_token"] == 90.0 and h["tree"] == "abc"


def test_the_gate_holds_its_files_exclusively_until_it_ends(tmp_path):
    files = [str(tmp_path / "gate"), str(tmp_path / "lock")]

    def free(f) -> bool:
        fd = os.open(f, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)
    with rival.Gate(files):
        assert not any(free(f) for f in files)
    assert all(free(f) for f in files)
    with rival.Gate([]):  # no files: no locks
        pass


def test_disk_counters_and_probe(tmp_path):
    dev = rival.disk_device(tmp_path)
    before = rival.diskstats(dev)
    if before is None:
        pytest.skip(f"{tmp_path} is on no block device listed in /proc/diskstats")
    f = tmp_path / "data"
    f.write_bytes(os.urandom(3 << 20))
    over = rival.disk_over(before, dev)
    assert over["disk_read_gb"] >= 0 and 0 <= over["disk_busy_over_run"]
    gbps = rival.disk_probe([f], chunk=1 << 20, nbytes=4 << 20, seconds=1.0, threads=2)
    assert gbps is None or gbps > 0  # None where the filesystem refuses O_DIRECT
    assert rival.disk_probe([f], chunk=8 << 20) is None  # no file larger than a piece


def test_an_h200_row_takes_our_decode_from_an_empty_context_as_llama_bench(tmp_path):
    """llama-bench's tg test decodes from an empty context; the H200 rows run `flashmoe bench --depth 0`
    and the row's decode figure is that one, the decode after the prompt kept beside it."""
    from flashmoe_plugin.convert.synth import synth
    assert all(r[3][:2] == rival.DEPTH0 for r in rival.ROWS["h200"])
    assert not any("--depth" in r[3] for r in rival.ROWS["cpu"])
    st = synth(tmp_path / "tiny", "tiny", quant="q4")
    out = rival.run_flashmoe(st, [*rival.DEPTH0, "--device", "cpu", "--no-verify"], 4, 2, None,
                             raw=tmp_path / "raw.json")
    assert "error" not in out, out.get("error")
    import json
    res = json.loads((tmp_path / "raw.json").read_text())
    assert out["decode_depth"] == 0 and out["decode_tok_s"] == res["decode_at_depth"]["tok_s"]
    assert out["decode_after_prompt_tok_s"] == res["decode_tok_s"]
    # the same JSON brought back from a device call: --from-raw rebuilds the row, llama.cpp's side kept
    raw = tmp_path / "call"
    raw.mkdir()
    (raw / "flashmoe-h200-row6.json").write_text((tmp_path / "raw.json").read_text())
    doc = tmp_path / "rival-h200.json"
    doc.write_text(json.dumps({"rows": {"6": {"llama_cpp": {"decode_tok_s": 2.0, "prefill_tok_s": 4.0}}}}))
    rival.main(["--machine", "h200", "--from-raw", str(raw), "--rows", "6", "--out", str(doc)])
    row = json.loads(doc.read_text())["rows"]["6"]
    assert row["llama_cpp"] == {"decode_tok_s": 2.0, "prefill_tok_s": 4.0}
    assert row["flashmoe"]["decode_tok_s"] == out["decode_tok_s"] and row["ratio_decode"] == out["decode_tok_s"] / 2
    assert row["ratio_prefill"] == out["prefill_tok_s"] / 4 and "--depth 0" in row["flashmoe"]["command"]
