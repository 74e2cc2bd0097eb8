"""Validate ``psctl simulate`` against real runs of ``bench/staleness.py`` (issue 19, item 4).

    .venv/bin/python bench/simulate_check.py bench/out/staleness-mf.json --workers 4,8

For each (workers, pattern, repeat) group of the experiment, the recorded trace of every run at a
source bound (``--source``, default the ASP run) is replayed at every other bound of the group
(settings without the staleness-aware rate, aggregation sum for s = 0), and the predicted time per
clock is compared with the measured one of the real run at that bound. Also: each run replayed at
its own bound (how well the model reproduces what it was fed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]

from client.simulate import simulate  # noqa: E402
from client.trace import Trace  # noqa: E402

KIND = {1: "pull", 2: "push"}


def trace_of(run: dict, staleness: int) -> Trace:
    t = json.loads((ROOT / run["trace"]).read_text())
    records = [(KIND[k], r, c, tm) for k, r, c, tm in t["records"]]
    return Trace.from_records(records, t["workers"], t["iterations"], staleness)


def bound(setting: str) -> int:
    s = setting.removeprefix("s=").split()[0]
    return -1 if s == "inf" else int(s)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("raw")
    ap.add_argument("--workers", default="4,8")
    ap.add_argument("--source", default="s=inf")
    args = ap.parse_args()
    runs = json.loads(Path(args.raw).read_text())["runs"]
    sizes = {int(w) for w in args.workers.split(",")}
    plain = {"s=0", "s=1", "s=2", "s=4", "s=8", "s=inf"}
    rows, own, cross = [], [], []
    groups = sorted({(r["workers"], r["pattern"], r["repeat"]) for r in runs if r["workers"] in sizes})
    for w, pattern, rep in groups:
        by = {r["setting"]: r for r in runs if (r["workers"], r["pattern"], r["repeat"]) == (w, pattern, rep)
              and r["setting"] in plain and r["state"] == "completed"}
        if args.source not in by:
            continue
        src = trace_of(by[args.source], bound(args.source))
        for setting, run in sorted(by.items(), key=lambda kv: bound(kv[0]) % 1000):
            measured = trace_of(run, bound(setting))
            predicted = simulate(src, bound(setting)).per_clock
            self_replay = simulate(measured, bound(setting)).per_clock
            err, own_err = predicted / measured.per_clock - 1, self_replay / measured.per_clock - 1
            own.append(abs(own_err))
            if setting != args.source:
                cross.append(abs(err))
            rows.append(f"| {w} | {pattern} | {rep} | {setting} | {measured.per_clock * 1e3:.2f} | "
                        f"{predicted * 1e3:.2f} ({err:+.0%}) | {self_replay * 1e3:.2f} ({own_err:+.0%}) |")
    print(f"| W | pattern | repeat | bound | measured ms/clock | predicted from the {args.source} run | "
          "replay of its own trace |\n|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    for name, errs in (("other bounds", cross), ("own bound", own)):
        if errs:
            print(f"\n{name}: median |error| {statistics.median(errs):.0%}, within 15%: "
                  f"{sum(e <= 0.15 for e in errs)}/{len(errs)}, max {max(errs):.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
