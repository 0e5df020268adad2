"""The checks too slow for the default test run: every test marked `slow`, with its wall time.

    python benchmarks/slow_checks.py               # all of them (~14 minutes on 2 quiet cores)
    python benchmarks/slow_checks.py -k multihost  # a subset (any pytest selection argument passes through)

The default `python -m pytest` leaves out the tests marked `slow` (pyproject.toml: `-m 'not slow'`)
so that the suite stays near 20 minutes on 2 cores. These are still real tests that must pass:
the end-to-end `raylm demo` on configs/smoke.yaml, the multi-host cluster in network namespaces,
pipeline stages spread over two raylets, a prepare job killed midway and resumed, dedup on
another worker count, the pipeline ingest of 4 Train workers. This runs them
through pytest and prints, per test, its outcome and seconds (setup and teardown included, from
pytest's JUnit XML), then the total; the exit status is pytest's.

Results: benchmarks/results/slow_checks.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        started = time.perf_counter()
        rc = subprocess.call(
            [sys.executable, "-m", "pytest", "-m", "slow", "-p", "no:cacheprovider", "-q", f"--junitxml={report}", *argv],
            cwd=ROOT,
        )
        wall = time.perf_counter() - started
        cases = ET.parse(report).getroot().iter("testcase") if report.exists() else []
        rows = []
        for case in cases:
            outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
            rows.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                         "seconds": round(float(case.get("time", 0)), 1)})  # fmt: skip
    width = max((len(r["test"]) for r in rows), default=10)
    print(f"\n{'test':<{width}}  {'outcome':<8} {'seconds':>8}")
    for r in rows:
        print(f"{r['test']:<{width}}  {r['outcome']:<8} {r['seconds']:>8.1f}")
    passed = sum(r["outcome"] == "passed" for r in rows)
    print(f"{passed} of {len(rows)} passed; {wall:.0f} s in all (pytest exit status {rc})")
    out = ROOT / "benchmarks" / "results" / "slow_checks.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"tests": rows, "wall_s": round(wall, 1), "pytest_exit_status": rc}, indent=2))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
