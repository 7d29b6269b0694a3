"""The soak of `benchmarks/serve_load.py --soak` at a small size (a few seconds): mixed streaming and
non-streaming clients, clients that disconnect, oversize and malformed requests against a real
`wiola serve` process on loopback; no 5xx, RSS growth under 10%, no request served after its client left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_short_soak_passes_its_checks(long_model, tmp_path):
    out = tmp_path / "soak.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--model", str(long_model), "--soak", "6",
                          "--warmup", "3", "--clients", "6", "--max-batch-size", "4", "--max-request-bytes", "65536",
                          "--device", "cpu", "--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["passed"] and all(report["checks"].values())
    assert report["rss_growth"] < 0.10 and not report["unexpected"]
    kinds = {key.split()[0] for key in report["outcomes"]}
    assert {"stream", "complete", "leave_stream", "leave_wait", "oversize", "malformed"} <= kinds, report["outcomes"]
    assert report["left"] > 0 and report["cancelled"] > 0 and report["finished_by_server"] == report["finishes_received"]
    assert report["requests_per_s"] > 0 and report["p99_latency_s"] >= report["p50_latency_s"] > 0
