"""Liveness and readiness over real HTTP: ``/health/live`` and ``/health/ready`` on the API port of
``fluxserve serve`` and on the health port of ``fluxserve worker``, with the job store up, cut off and back."""

from __future__ import annotations

from dataclasses import replace

import httpx
import pytest
from db_fixtures import fresh_schema
from fal_helpers import Server, free_port, settings_for
from probe_helpers import TcpProxy, get, start_worker, stop, through, wait_for
from sqlalchemy.engine import make_url

pytest_plugins = ["db_fixtures"]


@pytest.fixture
def own_pg_url(pg_url):
    """A PostgreSQL URL whose search_path is a schema of this test's own: no other test's jobs in its queue."""
    with fresh_schema(pg_url, "fluxserve_probes") as url:
        yield url


def test_live_and_ready_without_a_key_while_keys_are_required(demo_settings):
    with Server(settings_for(demo_settings, "health-keys"), start_workers=False, auth_required=True) as server:
        assert httpx.get(f"{server.url}/v1/models").status_code == 401  # keys are required here
        live = httpx.get(f"{server.url}/health/live")
        assert live.status_code == 200 and live.json() == {"status": "ok"}
        ready = httpx.get(f"{server.url}/health/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"status": "ready", "checks": {"store": "ok"}}  # API only: no workers to check
        assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}  # /health is as it was
        paths = httpx.get(f"{server.url}/openapi.json", timeout=60).json()["paths"]
        assert "get" in paths["/health/live"] and "503" in paths["/health/ready"]["get"]["responses"]


def test_ready_checks_the_worker_threads(demo_settings):
    with Server(settings_for(demo_settings, "health-workers")) as server:
        ready = httpx.get(f"{server.url}/health/ready")
        assert ready.status_code == 200 and ready.json()["checks"] == {"store": "ok", "workers": "ok"}
        server.app.state.workers[0].stop()  # a worker thread that ended: this process can no longer run jobs
        ready = httpx.get(f"{server.url}/health/ready")
        assert ready.status_code == 503
        assert ready.json()["status"] == "not ready"
        assert ready.json()["reason"] == "workers: 0 of 1 worker threads running"
        assert httpx.get(f"{server.url}/health/live").status_code == 200


def test_ready_is_503_while_the_store_is_unreachable(demo_settings, own_pg_url):
    with TcpProxy(make_url(own_pg_url).host, make_url(own_pg_url).port or 5432) as proxy:
        settings = replace(settings_for(demo_settings, "health-store"), db=through(proxy, own_pg_url))
        with Server(settings, start_workers=False) as server:
            assert httpx.get(f"{server.url}/health/ready").status_code == 200
            proxy.cut()
            ready = httpx.get(f"{server.url}/health/ready", timeout=30)
            assert ready.status_code == 503, ready.text
            assert ready.json()["reason"].startswith("store: the job store did not answer (")
            assert httpx.get(f"{server.url}/health/live").status_code == 200  # no restart for a database outage
            proxy.restore()
            assert wait_for(lambda: get(f"{server.url}/health/ready").status_code == 200, 60, "ready again")


def test_a_worker_answers_probes_on_its_health_port(tmp_path, own_pg_url):
    port = free_port()
    with TcpProxy(make_url(own_pg_url).host, make_url(own_pg_url).port or 5432) as proxy:
        process = start_worker(tmp_path, through(proxy, own_pg_url), port)
        try:
            base = f"http://127.0.0.1:{port}"
            live = wait_for(lambda: process.poll() is None and get(f"{base}/health/live"), 180, "the worker's probes")
            assert live.status_code == 200 and live.json() == {"status": "ok"}
            ready = httpx.get(f"{base}/health/ready")
            assert ready.status_code == 200 and ready.json()["checks"] == {"store": "ok", "workers": "ok"}
            assert httpx.get(f"{base}/other").status_code == 404
            proxy.cut()
            ready = httpx.get(f"{base}/health/ready", timeout=30)
            assert ready.status_code == 503 and ready.json()["reason"].startswith("store: the job store did not")
            assert httpx.get(f"{base}/health/live").status_code == 200
            proxy.restore()
            assert wait_for(lambda: get(f"{base}/health/ready").status_code == 200, 60, "ready again")
        finally:
            output = stop(process)
        assert process.returncode == 0, output
        assert "stopped after 0 job(s)" in output


def test_a_worker_serves_the_metrics_of_the_jobs_it_ran(tmp_path, demo_data_dir):
    """In a fleet the workers run the jobs: their generation-time histograms are on their health port."""
    from fluxserve.jobs.store import JobStore

    (tmp_path / "cache").symlink_to(demo_data_dir / "cache", target_is_directory=True)
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    store = JobStore(db)
    port = free_port()
    process = start_worker(tmp_path, db, port)
    try:
        job = store.submit(endpoint="fal-ai/flux-2/flash", dialect="fal", request={
            "model": "klein-4b", "prompt": "a fleet", "width": 64, "height": 64, "steps": 2})
        assert wait_for(lambda: process.poll() is None and store.get(job.id).status == "completed", 180,
                        "the worker to run the job")
        text_ = wait_for(lambda: (r := get(f"http://127.0.0.1:{port}/metrics")) and "fluxserve_jobs_finished" in r.text
                         and r.text, 30, "the metrics")
        assert 'fluxserve_jobs_finished_total{dialect="fal",endpoint="fal-ai/flux-2/flash",status="completed"} 1.0' \
            in text_
        assert 'fluxserve_inference_seconds_count{dialect="fal",endpoint="fal-ai/flux-2/flash"} 1.0' in text_
        assert "fluxserve_queue_depth" not in text_  # the queue is the API replicas' to report
    finally:
        stop(process)
        store.close()


def test_a_worker_says_when_its_health_port_is_taken(tmp_path):
    with _listening() as port:
        process = start_worker(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}", port)
        output, _ = process.communicate(timeout=180)
    assert process.returncode == 2, output
    assert f"error: --health-port: cannot listen on 127.0.0.1:{port}" in output


class _listening:
    """A port something already listens on."""

    def __enter__(self) -> int:
        import socket

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(1)
        return self.socket.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.socket.close()


