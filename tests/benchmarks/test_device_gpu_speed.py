"""benchmarks/device_gpu_speed.py --smoke: the device script's whole code path on the CPU, tiny sizes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_run_prints_one_table_with_every_section(tmp_path):
    out = tmp_path / "rows.json"
    # a budget that the eager rows fit and the full-compile row does not: the skip path runs too
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_gpu_speed.py"), "--smoke", "--budget", "25",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "# device_gpu_speed on CPU (smoke: tiny sizes)" in proc.stdout
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {r["section"] for r in rows} == {"distill step", "HPS", "evaluate"}
    timed = [r for r in rows if r["section"] == "distill step" and "samples_per_s" in r]
    assert len(timed) >= 3 and all(r["samples_per_s"] > 0 and r["host_syncs_per_step"] == 0 for r in timed)
    assert any("ckpt on" in r["config"] for r in timed) and any("channels_last on" in r["config"] for r in timed)
    assert float(next(r for r in rows if "bf16 vs fp32" in r["config"])["max_abs_score_diff"]) < 1e-2
    evaluate = [r["config"] for r in rows if r["section"] == "evaluate" and "images_per_s" in r]
    assert any("teacher" in c for c in evaluate) and any("student" in c for c in evaluate)
    assert any("FID" in c for c in evaluate)
    assert all("skipped" in r or any(k not in ("section", "config") for k in r) for r in rows)
