"""Folds the pieces of h11's H200 call (benchmarks/h200_h11.sh) into OUT/h200-h11-call.json and
removes them, so that the call's $OUT stays under the device's 8 files: host.txt, thp.json,
rows-LABEL.json (rival.py's --out) and mon-LABEL.jsonl (h11_monitor.py's samples)."""
import json
import os
import sys

out = sys.argv[1]
path = os.path.join(out, "h200-h11-call.json")
doc = json.load(open(path)) if os.path.exists(path) else {"rows": {}, "monitor": {}}
for name in sorted(os.listdir(out)):
    f = os.path.join(out, name)
    try:
        if name == "host.txt":
            doc["host"] = open(f).read()
        elif name == "thp.json":
            doc["huge_pages"] = json.load(open(f))
        elif name.startswith("rows-") and name.endswith(".json"):
            doc["rows"][name[5:-5]] = json.load(open(f))
        elif name.startswith("mon-") and name.endswith(".jsonl"):
            doc["monitor"][name[4:-6]] = [json.loads(l) for l in open(f) if l.strip()]
        else:
            continue
    except (OSError, ValueError) as e:
        doc.setdefault("errors", []).append(f"{name}: {e}")
    os.remove(f)
with open(path, "w") as fh:
    json.dump(doc, fh)
