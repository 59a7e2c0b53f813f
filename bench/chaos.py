"""Chaos figures: runs the chaos suite (`tests/test_chaos.py`) and the schemathesis conformance test, and
collects what they measured: faults injected, searches and QAT jobs accepted, lost, duplicated, orphan
processes, time to recover; schemathesis requests, 5xx and conformance failures.

    python bench/chaos.py            # PostgreSQL runs too when BITSEARCH_TEST_POSTGRES_URL is set
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import ROOT, machine, write_result  # noqa: E402


def main() -> None:
    out: dict = {"machine": machine(), "postgres": bool(os.environ.get("BITSEARCH_TEST_POSTGRES_URL"))}
    with tempfile.TemporaryDirectory() as tmp:
        chaos, conf = Path(tmp) / "chaos.json", Path(tmp) / "conformance.json"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "BITSEARCH_CHAOS_REPORT": str(chaos),
               "BITSEARCH_CONFORMANCE_REPORT": str(conf)}
        for name, test in (("chaos", "tests/test_chaos.py"), ("conformance", "tests/test_api_conformance.py")):
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, "-m", "pytest", test, "-q", "-p", "no:cacheprovider"], env=env,
                                 cwd=ROOT, capture_output=True, text=True)
            out[f"{name}_seconds"] = round(time.perf_counter() - t0, 1)
            out[f"{name}_passed"] = res.returncode == 0
            print(res.stdout.strip().splitlines()[-1] if res.stdout.strip() else res.stderr[-2000:], flush=True)
        out["chaos"] = json.loads(chaos.read_text()) if chaos.exists() else {}
        out["conformance"] = json.loads(conf.read_text()) if conf.exists() else {}
    print(json.dumps(out, indent=2))
    write_result("chaos.json", json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
