"""``benchmarks/serving_load.py`` on the CPU as a user runs it: ``fluxserve serve --demo`` in its own process,
official fal clients on loopback (here through the queue: submit, status polls, result), then the same
requests through the engine alone in a process of its own. Numbers are checked for being there and positive,
never for their size (no timing assertions)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "serving_load.py"


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_serving_load_cli_demo_with_subscribing_clients(tmp_path):
    out = tmp_path / "serving.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--demo", "--models", "klein-4b", "--concurrency", "2", "--requests", "3",
         "--warmup", "1", "--engine-requests", "2", "--call", "subscribe", "--poll-interval", "0.02",
         "--cpu-threads", "1", "--data-dir", str(tmp_path / "data"), "--json", str(out)],
        check=False, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["client"]["call"] == "subscribe" and report["client"]["poll_interval_s"] == 0.02
    assert report["config"]["demo"] is True and report["config"]["size"] == 512
    row = report["models"]["klein-4b"]
    level = row["levels"]["2"]
    assert level["completed"] == 3 and level["errors"] == 0
    for key in ("images_per_s", "p50_s", "p95_s", "engine_images_per_s", "engine_images_per_s_in_server",
                "vs_engine", "wait_p50_s"):
        assert positive(level[key]), (key, level[key])
    assert row["engine_alone"]["requests"] == 2 and "1" not in row["levels"]
    assert row["added_latency_p50_s"] is None  # measured at one client only: not run here
    assert row["targets"]["added_latency_p50_s"]["met"] is None
    assert isinstance(row["targets"]["saturation_vs_engine"]["met"], bool)
    assert row["device"]["type"] == "cpu"
    # the server's store had every job the clients sent, warm-up and measured, completed
    jobs = row["server"]["health"]["jobs"]
    assert jobs["completed"] == 1 + 3 and jobs["failed"] == 0
    assert "klein-4b (fal-ai/flux-2/klein/4b) 512x512" in done.stdout and "c=2:" in done.stdout
    assert (tmp_path / "data" / "server-klein-4b.log").read_text().count("Finished server process") == 1
