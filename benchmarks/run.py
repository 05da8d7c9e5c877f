"""Run every benchmark script and print one table of their results.

python benchmarks/run.py              # full sizes (takes minutes)
python benchmarks/run.py --quick      # what CI runs
python benchmarks/run.py dense sparse # only these scripts
python benchmarks/run.py --json results.jsonl   # also keep the raw JSON lines
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = ["traffic", "dense", "sparse", "tiny", "startup", "training", "capacity"]


def run(name: str, quick: bool) -> list[dict[str, object]]:
    cmd = [sys.executable, os.path.join(HERE, f"{name}.py")] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{name}.py failed with exit code {proc.returncode}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return "" if v is None else str(v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("scripts", nargs="*", default=SCRIPTS)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", help="append every result line to this file")
    args = p.parse_args()
    rows = []
    for name in args.scripts:
        recs = run(name, args.quick)
        rows.extend(recs)
        if args.json:
            with open(args.json, "a") as f:
                for r in recs:
                    f.write(json.dumps(r) + "\n")
    head = ["bench", "case", "value", "unit", "baseline", "ratio", "target", "met"]
    table = [[fmt(r.get(h)) for h in head] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(head)]
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for t in table:
        print(" | ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)))


if __name__ == "__main__":
    main()
