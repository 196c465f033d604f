"""Write tests/tiers.json: which tests leave the fast tier (`pytest -m "not slow"`), from measured times.

Run the whole suite with `--junitxml=junit.xml`, then `python tests/tier.py junit.xml [more.xml ...]`
(a later file's times win: measure new tests alone and add their file): tests are
taken fastest first into the fast tier until their measured seconds reach `--budget`; the rest is
marked slow by tests/conftest.py (as is any test of the real model, measured or not). A test the
measurement did not see (a new one) is in the fast tier until the next measurement. The budget is
below the tier's 5-minute goal because these machines drift about 2x from day to day.
"""

from __future__ import annotations

import argparse
import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent


def durations(junit: Path) -> dict[str, float]:
    """{node id: seconds (setup + call + teardown)} of the tests that passed."""
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        if case.find("skipped") is not None or case.find("failure") is not None or case.find("error") is not None:
            continue
        path = case.get("classname").replace(".", "/") + ".py"
        out[f"{path}::{case.get('name')}"] = float(case.get("time", 0))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("junit", type=Path, nargs="+")
    ap.add_argument("--budget", type=float, default=150.0, help="seconds of measured test time in the fast tier")
    ap.add_argument("--out", type=Path, default=HERE / "tiers.json")
    args = ap.parse_args()
    times = {}
    for junit in args.junit:
        times.update(durations(junit))
    fast, total = [], 0.0
    for node, t in sorted(times.items(), key=lambda kv: kv[1]):
        if total + t > args.budget:
            break
        fast.append(node)
        total += t
    slow = sorted(set(times) - set(fast))
    args.out.write_text(json.dumps({
        "budget_s": args.budget, "measured": time.strftime("%Y-%m-%d", time.gmtime(args.junit[0].stat().st_mtime)),
        "fast_tests": len(fast), "fast_s": round(total, 1), "slow_tests": len(slow),
        "slow_s": round(sum(times[n] for n in slow), 1), "slow": slow}, indent=1) + "\n")
    print(f"fast tier: {len(fast)} tests, {total:.0f} s measured; slow: {len(slow)} tests, "
          f"{sum(times[n] for n in slow):.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
