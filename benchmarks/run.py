"""`make bench` / `ddl bench [PART ...]`: run the benchmarks (all by default, 13-25 minutes on 2 cores, about
35 more for `data`, which needs 40 GB of free disk, 4 for `hosts`, which needs root, 4 for `zero`, and about 5 for
`export`, and about 35 for `tabular`), then rebuild BENCHMARKS.md and its charts from benchmarks/results/.

    .venv/bin/python benchmarks/run.py [allreduce] [scaling] [overhead] [peer] [data] [hosts] [zero] [export]
                                       [tabular] [report]
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARTS = {
    "allreduce": ["allreduce.py", "--controller", "gloo"],
    "scaling": ["scaling.py", "--autotune"],
    "overhead": ["loops.py", "overhead"],
    "peer": ["loops.py", "peer"],
    "data": ["data.py"],
    "hosts": ["hosts.py"],
    "zero": ["zero.py"],
    "export": ["onnx_latency.py"],
    "tabular": ["tabular_quality.py"],
}


def main(parts: list[str]) -> int:
    unknown = sorted(set(parts) - set(PARTS) - {"report"})
    if unknown:
        print(f"unknown benchmark {unknown}; choose from {', '.join([*PARTS, 'report'])}", file=sys.stderr)
        return 2
    for part in [p for p in PARTS if p in parts or not parts]:
        started = time.perf_counter()
        print(f"== {part}", flush=True)
        script, *args = PARTS[part]
        code = subprocess.run([sys.executable, str(HERE / script), *args], check=False).returncode
        if code != 0:
            print(f"benchmark {part} failed (exit {code}); BENCHMARKS.md not rebuilt", file=sys.stderr)
            return code
        print(f"== {part}: {time.perf_counter() - started:.0f} s", flush=True)
    sys.path.insert(0, str(HERE.parent))
    from benchmarks.report import build

    build()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
