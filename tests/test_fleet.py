"""The fleet through a crash (``benchmarks/fleet.py``): 2 API processes and 2 worker processes on PostgreSQL
and a real S3 server (moto_server), 3 clients through the fal, OpenAI and Replicate APIs, one worker killed
(SIGKILL) while it runs a job and one API process killed, both started again. Every accepted job completes
once, its outputs are readable through both API replicas, and the killed worker's job completes on its second
attempt. Bounded: about 30 s of load on the demo models, then at most a few minutes to drain."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def fleet_module(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import fleet

    yield fleet
    sys.modules.pop("fleet", None)


def test_the_fleet_loses_nothing_when_a_worker_and_an_api_are_killed(fleet_module, demo_data_dir, tmp_path):
    from db_fixtures import PG_URL

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "cache").symlink_to(demo_data_dir / "cache", target_is_directory=True)  # the session's demo models
    report = fleet_module.run(db=PG_URL, apis=2, workers=2, clients=3, seconds=30, step_delay=0.1,
                              data_dir=str(data_dir))
    print(report)
    assert report["problems"] == []
    assert set(report["latency_s"]) == {"fal", "openai", "replicate"}  # every API served through the crash
    assert report["killed"]["job_status"] == "completed" and report["killed"]["job_attempts"] == 2
    assert report["outputs_checked"] >= report["requests"]
    assert report["api_recovery_s"] > 0 and report["worker_job_recovery_s"] > 0
