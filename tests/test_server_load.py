"""`flashmoe serve` under load, scaled down for CI (benchmarks/server_load.py runs the long version):
a real server process on 127.0.0.1, concurrent clients with random hang-ups and malformed requests
interleaved. The server stays up, every answered request is well-formed, each hang-up stops its
generation, and RSS stays bounded."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import server_load  # noqa: E402


def test_server_survives_a_loaded_loopback():
    r = server_load.run("demo", clients=6, seconds=12, seed=1)
    assert r["server_alive"] and not r["failures"], r
    kinds = r["by_kind"]
    assert kinds.get("bad", {}).get("bad_ok", 0) > 0 and kinds.get("stream", {}).get("ok", 0) > 0, r
    assert r["hung_up"] > 0 and r["server_generations"]["cancelled"] >= r["hung_up"], r
    assert r["server_generations"]["failed"] == 0, r
    assert r["rss_peak_bytes"] < r["rss_start_bytes"] + (512 << 20), r  # no growth with the request count
