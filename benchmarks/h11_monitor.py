"""Who uses the cores while a `flashmoe bench` runs (h11): samples /proc every PERIOD seconds until
killed and writes one JSON line per sample to OUT.

    python3 benchmarks/h11_monitor.py OUT.jsonl [PERIOD]

Per sample: the machine's busy cores (/proc/stat: user, system, iowait, softirq in cores), the
bench process's (its cmdline holds "bench") busy cores, its threads above 20% of a core (name,
tid, share), its AnonHugePages, and the busiest threads of every other process (kernel threads
included: kcompactd, khugepaged, kswapd would show here)."""
from __future__ import annotations

import json
import os
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")


def cpu_line() -> list[int]:
    with open("/proc/stat") as f:
        return [int(v) for v in f.readline().split()[1:]]


def threads() -> dict:
    """(pid, tid) -> (comm, ticks) for every thread on the machine."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    s = f.read()
                comm, rest = s[s.index("(") + 1:s.rindex(")")], s[s.rindex(")") + 2:].split()
                out[(int(pid), int(tid))] = (comm, int(rest[11]) + int(rest[12]))
        except (OSError, ValueError):
            continue
    return out


def bench_pid() -> int | None:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().split(b"\0")
            except OSError:
                continue
            if b"bench" in cmd and any(b"flashmoe_plugin.cli" in c for c in cmd):
                return int(pid)
    return None


def _cmd(pid) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ")[:160].decode(errors="replace")
    except OSError:
        return ""


def huge_kb(pid) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next((int(l.split()[1]) for l in f if l.startswith("AnonHugePages:")), None)
    except OSError:
        return None


def main(out: str, period: float = 0.25):
    me = os.getpid()
    prev_c, prev_t, prev_time = cpu_line(), threads(), time.time()
    with open(out, "a") as f:
        while True:
            time.sleep(period)
            c, t, now = cpu_line(), threads(), time.time()
            dt = (now - prev_time) * HZ
            d = [a - b for a, b in zip(c, prev_c)]
            pid = bench_pid()
            busy = {k: (v[0], (v[1] - prev_t[k][1]) / dt) for k, v in t.items() if k in prev_t and k[0] != me}
            mine = {k: v for k, v in busy.items() if k[0] == pid}
            rest = sorted(((v[1], v[0], k[0]) for k, v in busy.items() if k[0] != pid and v[1] > 0.05), reverse=True)
            rec = {"t": round(now, 2), "machine_cores": {"user": round((d[0] + d[1]) / dt, 2), "system": round(d[2] / dt, 2),
                                                         "iowait": round(d[4] / dt, 2), "softirq": round((d[5] + d[6]) / dt, 2)},
                   "load": os.getloadavg()[0], "bench_pid": pid}
            if pid is not None:
                rec["bench_cores"] = round(sum(v[1] for v in mine.values()), 2)
                rec["bench_threads"] = sorted(([v[0], k[1], round(v[1], 2)] for k, v in mine.items() if v[1] > 0.2),
                                              key=lambda r: -r[2])[:24]
                rec["bench_anon_huge_mib"] = (huge_kb(pid) or 0) // 1024
            rec["others"] = [[n, p, round(s, 2), _cmd(p)] for s, n, p in rest[:8]]
            f.write(json.dumps(rec) + "\n")
            f.flush()
            prev_c, prev_t, prev_time = c, t, now


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 0.25)
