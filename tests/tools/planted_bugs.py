"""Mutation check: plant known bugs one at a time and run the tests that should catch each; a bug
whose tests still pass is a hole in the test suite. Not part of the test run (it edits sources
and restores them): run it by hand or in a release check.

    python tests/tools/planted_bugs.py            # all bugs, a table and the score
    python tests/tools/planted_bugs.py --json     # machine-readable
    python tests/tools/planted_bugs.py lfu topk   # some of them

Each bug: (name, file, the exact text, its mutation, the tests to run). The text must occur once
in the file: when the code moves on, the script says which entry to update instead of testing
nothing. Only Python sources are mutated (no rebuild needed)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SAMPLER_TESTS = ["tests/test_sampling_oracle.py"]

BUGS = [
    ("lfu-evicts-most-frequent", "flashmoe_plugin/pager/policies.py",
     "return min(candidates, key=lambda k: (self.count.get(k, 0), rank[k]))",
     "return max(candidates, key=lambda k: (self.count.get(k, 0), rank[k]))",
     ["tests/test_bug_catchers.py::test_lfu_hand_worked_trace", "tests/test_policies.py"]),
    ("top_k-off", "flashmoe_plugin/runtime/sampling.py",
     "if 0 < p.top_k < x.numel():", "if False:", SAMPLER_TESTS),
    ("top_p-off", "flashmoe_plugin/runtime/sampling.py",
     "if p.top_p < 1.0:", "if False:", SAMPLER_TESTS),
    ("min_p-off", "flashmoe_plugin/runtime/sampling.py",
     "if p.min_p > 0:", "if False:", SAMPLER_TESTS),
    ("typical_p-off", "flashmoe_plugin/runtime/sampling.py",
     "if 0 < p.typical_p < 1.0:", "if False:", SAMPLER_TESTS),
    ("repeat_penalty-inverted", "flashmoe_plugin/runtime/sampling.py",
     "torch.where(v > 0, v / p.repeat_penalty, v * p.repeat_penalty)",
     "torch.where(v > 0, v * p.repeat_penalty, v / p.repeat_penalty)", SAMPLER_TESTS),
    ("frequency_penalty-ignored", "flashmoe_plugin/runtime/sampling.py",
     "v = v - counts.float() * p.frequency_penalty - p.presence_penalty",
     "v = v - p.presence_penalty", SAMPLER_TESTS),
    ("presence_penalty-ignored", "flashmoe_plugin/runtime/sampling.py",
     "v = v - counts.float() * p.frequency_penalty - p.presence_penalty",
     "v = v - counts.float() * p.frequency_penalty", SAMPLER_TESTS),
    ("negative-temperature-not-greedy", "flashmoe_plugin/runtime/sampling.py",
     "if p.temperature <= 0:", "if p.temperature == 0:", SAMPLER_TESTS),
    ("logprobs-unnormalised", "adapters/llama_cpp.py",
     "return z - np.log(np.sum(np.exp(z)))", "return z",
     ["tests/test_bug_catchers.py::test_completion_logprobs_are_log_softmax_of_the_logits"]),
    ("forward-keeps-last-chunk-only", "flashmoe_plugin/runtime/engine.py",
     "outs.append(logits.cpu())", "outs = [logits.cpu()]",
     ["tests/test_bug_catchers.py::test_forward_keeps_the_logits_of_every_chunk"]),
    ("verify-skips-dense", "flashmoe_plugin/store/format.py",
     "if dense_crc is not None and file_crc32c(self.path / DENSE) != int(dense_crc):", "if False:",
     ["tests/test_bug_catchers.py::test_verify_checks_the_dense_file"]),
    ("layer-path-escapes-store", "flashmoe_plugin/store/validate.py",
     'if p.is_absolute() or ".." in p.parts or (prefix is not None and p.parts[:1] != (prefix,)):',
     "if False:",
     ["tests/test_forged_stores.py"]),
    ("pager-no-retry", "flashmoe_plugin/pager/pager.py",
     "and attempt < self.retries and not r.prefetch:", "and False:",
     ["tests/test_faults.py::test_transient_faults_are_retried_and_change_nothing"]),
]


def run(bug) -> dict:
    name, rel, text, mutant, tests = bug
    path = ROOT / rel
    src = path.read_text()
    if src.count(text) != 1:
        return {"bug": name, "caught": None, "why": f"{rel}: the text to mutate occurs {src.count(text)} times; "
                                                     f"update this entry"}
    t0 = time.perf_counter()
    try:
        path.write_text(src.replace(text, mutant))
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                             cwd=ROOT, capture_output=True, text=True, timeout=1800)
    finally:
        path.write_text(src)
    last = (res.stdout.strip().splitlines() or [""])[-1]
    return {"bug": name, "caught": res.returncode != 0, "tests": tests, "result": last,
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv):
    as_json = "--json" in argv
    names = [a for a in argv if not a.startswith("--")]
    bugs = [b for b in BUGS if not names or any(n in b[0] for n in names)]
    results = [run(b) for b in bugs]
    caught = sum(bool(r["caught"]) for r in results)
    if as_json:
        print(json.dumps({"caught": caught, "planted": len(results), "results": results}, indent=1))
    else:
        for r in results:
            mark = {True: "caught", False: "MISSED", None: "STALE"}[r["caught"]]
            print(f"{mark:7s} {r['bug']:34s} {r.get('result') or r.get('why')}")
        print(f"score: {caught}/{len(results)} planted bugs caught")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
