"""The one-call GPU suite runs its every section on the CPU (--dry-run) and reports them.

The GPU run happens once per lent machine; this keeps its code paths (section processes,
time limits, the JSON and markdown summaries) from failing there for reasons a CPU can see.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_suite_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--out", str(tmp_path),
                           "--dry-run"], capture_output=True, text=True, timeout=600)
    summary = json.loads((tmp_path / "summary.json").read_text())
    statuses = {name: sec["status"] for name, sec in summary["sections"].items()}
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_suite

    assert statuses == {name: "ok" for name, _, _ in gpu_suite.SECTIONS}, (
        statuses, proc.stdout[-3000:], (tmp_path / "suite.log").read_text()[-5000:])
    assert proc.returncode == 0
    text = (tmp_path / "summary.md").read_text()
    assert "DRY RUN" in text and "Correctness sweep" in text and "| resnet50 |" in text
    sweep = summary["sections"]["sweep"]
    assert sweep["cases"] >= 50 and not sweep["failed"]
