"""Serving load: what ``fluxserve serve`` delivers to N concurrent official fal clients, against what the engine
alone does with the same requests.

    python benchmarks/serving_load.py [--models klein-4b,dev] [--concurrency 1,2,4,8] [--requests 16]
        [--warmup 2] [--size 1024] [--steps MODEL=N,...] [--demo] [--device DEVICE] [--acceleration LEVEL]
        [--call run|subscribe] [--poll-interval S] [--engine-requests N] [--data-dir DIR] [--json OUT]

Per model ([klein] 4B through ``fal-ai/flux-2/klein/4b``, [dev] through ``fal-ai/flux-2``), in this order:

1. ``fluxserve serve`` in a process of its own on a free port of 127.0.0.1, with its own SQLite job store in
   the data directory, one worker, the model preloaded: built with seeded random weights of the real
   architecture on the GPU (``--random-weights``: no download, noise images, safety checker off) or, with
   ``--demo`` (the default without CUDA), the tiny demo model.
2. ``--warmup`` requests, one at a time (the first compiles and records CUDA graphs), not counted.
3. For each concurrency level c: ``--requests`` requests from c client threads, each with its own
   ``fal_client.SyncClient`` (the official fal client, pointed at the server by ``fluxserve.compat.fal``), in a
   closed loop (a client sends its next request when it holds the last result). ``--call run`` (default):
   ``client.run``, one HTTP request the server answers with the job's result; ``--call subscribe``: a queue
   submit, status polls every ``--poll-interval`` seconds (fal_client's default is 0.1 s, which a client's
   latency then includes), then the result. Every request has a prompt of its own, so the prompt cache never
   hides the text encoder. Images are not downloaded: the result is the JSON with their URLs.
4. The server stopped by its PID (SIGTERM, then SIGKILL if it lingers), on error too.
5. The engine alone: the warm-up requests and the first ``--engine-requests`` measured ones, exactly as the
   server stored them (the canonical requests of its job store), run back to back through the engine in a fresh
   process of its own with the same settings (the same placement plan, the same compiler caches), pipelined as
   the server's worker pipelines them: the next request renders while the last one's images encode.

Per model and concurrency level (``levels``):
  images_per_s                  images / wall time from the first submit to the last result (client side)
  p50_s, p95_s                  client latency of a request: submit -> result in hand
  engine_images_per_s           the engine alone (step 5): images / wall time of the back-to-back replay. The
                                reference: through the server at saturation the target is >= 90% of it
  engine_images_per_s_in_server images / the sum of the jobs' seconds on the engine's thread inside the server
                                (timings.inference less encoding: text encoding to safety, the GPU part; how
                                fast the engine ran there, lower than alone where serving takes its CPU)
  vs_engine                     images_per_s / engine_images_per_s
  wait_p50_s                    median of (latency - the job's own inference seconds): queueing + overhead
  gpu_busy.nvml                 mean NVML utilisation of the GPU over the level (the fraction of time a kernel
                                ran, sampled every 50 ms; null on the CPU or without NVML)
  gpu_busy.engine_seconds_over_wall   the jobs' seconds on the engine's thread (as above) / wall time: the
                                fraction of the time the engine was running a job's GPU part (its CPU work
                                there, such as launches and the text encoder's tokenizer, included; the images'
                                encoding, which overlaps the next job, not)
Per model: ``added_latency_p50_s``, the median at concurrency 1 of the latency less the job's inference seconds
(what the server adds to one request; target <= 20 ms), split by the job's own timestamps into submit, start,
finish and notify (as benchmarks/queue_overhead.py defines them), and ``saturation``: the best level's
images_per_s over engine_images_per_s (target >= 0.9). Nothing leaves the machine: loopback only, no download.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if (HERE.parent / "src" / "fluxserve").is_dir() and str(HERE.parent / "src") not in sys.path:
    sys.path.insert(0, str(HERE.parent / "src"))

from serving import GpuSampler, child_env, cpu_model, loopback_only, percentile, start_server, stop_server

ENDPOINTS = {"klein-4b": "fal-ai/flux-2/klein/4b", "dev": "fal-ai/flux-2"}
SATURATION_TARGET = 0.9  # through the server at saturation / the engine alone
ADDED_LATENCY_TARGET_S = 0.020  # p50 at concurrency 1
STAGES = ("text_encoding", "denoising", "decoding", "safety", "encoding", "inference")


@dataclass(frozen=True)
class LoadConfig:
    """One serving benchmark: which models, how hard, on which weights. ``steps``: per model, the endpoint's
    default where absent."""

    models: tuple[str, ...] = ("klein-4b", "dev")
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    requests: int = 16
    warmup: int = 2
    size: int = 1024
    steps: dict[str, int] = field(default_factory=dict)
    demo: bool = False
    device: str = ""
    acceleration: str = "regular"
    call: str = "run"
    poll_interval: float = 0.1
    engine_requests: int = 16
    request_timeout_s: float = 600.0
    start_timeout_s: float = 900.0
    replay_timeout_s: float = 1800.0
    cpu_threads: int | None = None  # OMP_NUM_THREADS of the server and the engine alone (None: torch's default)

    def weights(self) -> str:
        return "demo models" if self.demo else "random weights (full-size architectures)"

    def weights_flags(self) -> list[str]:
        return ["--demo"] if self.demo else ["--random-weights"]

    def env(self) -> dict[str, str]:
        """What the server and the engine-alone processes get in their environment on top of ``child_env``."""
        return {"OMP_NUM_THREADS": str(self.cpu_threads)} if self.cpu_threads else {}


@dataclass
class Sample:
    """One request as its client saw it."""

    index: int
    prompt: str
    submitted_at: float  # time.time() when the client started the call
    latency_s: float | None = None
    ended: float | None = None  # perf_counter() when the client held the result
    images: int = 0
    timings: dict = field(default_factory=dict)
    error: str | None = None


# ---- the clients --------------------------------------------------------------------------------------------
def prompt_for(model: str, index: int) -> str:
    """A prompt of its own for every request of a run (never a prompt-cache hit, never a substring of another)."""
    return f"A lighthouse on a rocky coast at dusk, waves breaking, 35mm photograph ({model} request {index:05d})"


def arguments(config: LoadConfig, model: str, index: int) -> dict:
    """The fal input of request ``index``: the endpoint's defaults but the size, the steps (where given), the
    acceleration level, a prompt and a seed of its own."""
    body = {"prompt": prompt_for(model, index), "seed": index,
            "image_size": {"width": config.size, "height": config.size}, "acceleration": config.acceleration}
    if model in config.steps:
        body["num_inference_steps"] = config.steps[model]
    return body


def drive(endpoint: str, bodies: list[tuple[int, dict]], concurrency: int, config: LoadConfig) -> tuple[list[Sample],
                                                                                                          float]:
    """Send ``bodies`` from ``concurrency`` client threads, each with its own ``fal_client.SyncClient``, in a
    closed loop; (samples in submission order, wall seconds from the first submit to the last result). Every
    call is bounded by ``config.request_timeout_s``; a failed call is a sample with its error."""
    import fal_client

    local = threading.local()

    def one(index: int, body: dict) -> Sample:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = fal_client.SyncClient(default_timeout=config.request_timeout_s)
        sample = Sample(index, body["prompt"], time.time())
        start = time.perf_counter()
        try:
            if config.call == "run":
                result = client.run(endpoint, arguments=body, timeout=config.request_timeout_s)
            else:
                result = client.subscribe(endpoint, arguments=body, interval=config.poll_interval,
                                          client_timeout=config.request_timeout_s)
            sample.ended = time.perf_counter()
            sample.latency_s = sample.ended - start
            sample.images = len(result.get("images") or [])
            sample.timings = result.get("timings") or {}
            if not sample.images:
                sample.error = f"no images in the result: {str(result)[:300]}"
        except Exception as exc:  # noqa: BLE001 - recorded with the sample
            sample.error = f"{type(exc).__name__}: {str(exc)[:500]}"
        return sample

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="fal-client") as pool:
        start = time.perf_counter()
        futures = [pool.submit(one, index, body) for index, body in bodies]
        samples = [future.result() for future in futures]  # each call is bounded by its own timeout
    ends = [s.ended for s in samples if s.ended is not None]
    return samples, (max(ends) - start) if ends else 0.0


# ---- statistics ---------------------------------------------------------------------------------------------
def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _inference(sample: Sample) -> float | None:
    value = sample.timings.get("inference")
    return float(value) if isinstance(value, (int, float)) else None


def _engine_thread(sample: Sample) -> float:
    """The job's seconds on the engine's thread: its inference time less the images' encoding (which runs on a
    pool of its own, overlapping the next job)."""
    encoding = sample.timings.get("encoding")
    return (_inference(sample) or 0.0) - (float(encoding) if isinstance(encoding, (int, float)) else 0.0)


def level_stats(samples: list[Sample], wall: float, gpu: dict) -> dict:
    """The numbers of one concurrency level from its samples (the engine-alone ones are added later)."""
    done = [s for s in samples if s.error is None]
    latencies = [s.latency_s for s in done]
    images = sum(s.images for s in done)
    engine_s = sum(_engine_thread(s) for s in done)
    waits = [s.latency_s - _inference(s) for s in done if _inference(s) is not None]
    errors = [s.error for s in samples if s.error is not None]
    return {
        "requests": len(samples), "completed": len(done), "errors": len(errors), "first_error": errors[0] if errors
        else None, "images": images, "wall_s": wall,
        "images_per_s": images / wall if wall and images else None,
        "p50_s": _median(latencies), "p95_s": percentile(latencies, 95) if latencies else None,
        "max_s": max(latencies) if latencies else None,
        "engine_images_per_s": None, "vs_engine": None,
        "engine_images_per_s_in_server": images / engine_s if engine_s else None,
        "wait_p50_s": _median(waits), "wait_p95_s": percentile(waits, 95) if waits else None,
        "stages_p50_s": {stage: _median([float(s.timings[stage]) for s in done if stage in s.timings])
                         for stage in STAGES},
        "gpu_busy": {**gpu, "engine_seconds_over_wall": engine_s / wall if wall else None},
    }


def latency_split(samples: list[Sample], jobs: dict[str, object]) -> dict | None:
    """Medians (s) of where a request's time outside the engine went, from the job's own timestamps (same
    clock as the client): submit = created - sent, start = started - created (worker wake-up and claim), finish
    = completed - started - inference (outputs to storage, the completing UPDATE), notify = until the client
    held the result."""
    rows = []
    for s in samples:
        job = jobs.get(s.prompt)
        inference = _inference(s)
        if s.error is not None or job is None or inference is None or None in (job.started_at, job.completed_at):
            continue
        created, started, completed = (t.timestamp() for t in (job.created_at, job.started_at, job.completed_at))
        seen = s.submitted_at + s.latency_s
        rows.append((created - s.submitted_at, started - created, completed - started - inference, seen - completed))
    if not rows:
        return None
    return {name: statistics.median(row[i] for row in rows)
            for i, name in enumerate(("submit_s", "start_s", "finish_s", "notify_s"))}


def stored_jobs(db_url: str, endpoint: str) -> dict[str, object]:
    """The server's jobs of ``endpoint`` by prompt (read after it stopped, from its SQLite file)."""
    from fluxserve.jobs.store import JobStore

    store = JobStore(db_url)
    try:
        return {(job.request or {}).get("prompt"): job for job in store.list(endpoint=endpoint, limit=100_000)}
    finally:
        store.close()


# ---- the engine alone ---------------------------------------------------------------------------------------
ENCODE_AHEAD = 1  # as a server's worker: one job rendering while the last one's images encode


def engine_replay(requests: list[dict], warmup: int, *, data_dir: Path, demo: bool, device: str) -> dict:
    """Run the canonical requests back to back through the engine (the first ``warmup`` not counted), as fast
    as it goes: ``Engine.render`` of the next request while the last one's images encode (``Engine.encode_images``
    on a thread of its own, at most ``ENCODE_AHEAD`` waiting, as the server's worker pipelines them). Images per
    second of wall time and the stages, with the engine's placement and the device. Runs in a process of its own
    (``--engine-replay``), so that nothing of the server's is resident."""
    from fluxserve.catalog import Catalog
    from fluxserve.config import Settings
    from fluxserve.engine import Engine
    from fluxserve.request import GenerationRequest

    settings = Settings(data_dir=data_dir, demo=demo, random_weights="" if demo else "full", device=device)
    engine = Engine(settings, Catalog.load())
    parsed = [GenerationRequest.model_validate(request) for request in requests]
    start = time.perf_counter()
    engine.load(parsed[0].model)
    load_s = time.perf_counter() - start
    warm = []
    for request in parsed[:warmup]:
        start = time.perf_counter()
        engine.generate(request)
        warm.append(time.perf_counter() - start)
    results = []
    with ThreadPoolExecutor(max_workers=ENCODE_AHEAD, thread_name_prefix="finish") as finisher:
        pending: list = []
        start = time.perf_counter()
        for request in parsed[warmup:]:
            rendered = engine.render(request)
            while len(pending) >= ENCODE_AHEAD:
                results.append(pending.pop(0).result())
            pending.append(finisher.submit(engine.encode_images, rendered))
        results += [future.result() for future in pending]
        wall = time.perf_counter() - start
    images = sum(len(result.images) for result in results)
    return {
        "requests": len(results), "images": images, "wall_s": wall,
        "images_per_s": images / wall if wall and images else None,
        "pipelined": f"render the next request while the last one's images encode ({ENCODE_AHEAD} at most)",
        "load_s": load_s, "warmup_s": warm,
        "stages_p50_s": {stage: _median([float(r.timings.get(stage, 0.0)) for r in results]) for stage in STAGES},
        "placement": engine.placement(), "device": device_info(engine.device),
    }


def device_info(device) -> dict:
    """``bench.environment`` of the engine's device, with the CPU's model name on a CPU."""
    from fluxserve import bench

    info = bench.environment(device)
    if info["type"] == "cpu":
        info["name"] = cpu_model()
    return info


def run_engine_replay(config: LoadConfig, device: str, requests: list[dict], warmup: int, data_dir: Path,
                      name: str) -> dict:
    """``engine_replay`` in a fresh process (this script with ``--engine-replay``), bounded by
    ``config.replay_timeout_s``; its log goes to ``DATA_DIR/<name>.log``."""
    requests_path, out_path = data_dir / f"{name}-requests.json", data_dir / f"{name}.json"
    requests_path.write_text(json.dumps(requests))
    out_path.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--engine-replay", str(requests_path),
               "--engine-warmup", str(warmup), "--json", str(out_path), "--data-dir", str(data_dir),
               "--device", device, *(["--demo"] if config.demo else [])]
    with (data_dir / f"{name}.log").open("ab") as log:
        done = subprocess.run(command, env=child_env(config.env()), stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=config.replay_timeout_s, check=False)
    if done.returncode != 0 or not out_path.exists():
        tail = (data_dir / f"{name}.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the engine-alone replay exited with {done.returncode}: {tail}")
    return json.loads(out_path.read_text())


# ---- one model ----------------------------------------------------------------------------------------------
def measure_model(config: LoadConfig, model: str, data_dir: Path,
                  on_update: Callable[[dict], None] | None = None) -> dict:
    """Steps 1-5 of the module docstring for ``model``; the report grows as it goes (``on_update`` after each
    step, e.g. to save it) and is returned whole. The server is stopped whatever happens."""
    import fluxserve.compat.fal

    endpoint = ENDPOINTS[model]
    device = config.device or default_device()  # one device for the server and the engine alone alike
    data_dir.mkdir(parents=True, exist_ok=True)
    db_path = data_dir / f"serving-{model}.db"
    for stale in (db_path, *(db_path.with_name(db_path.name + tail) for tail in ("-wal", "-shm"))):
        stale.unlink(missing_ok=True)  # a store of its own for this run (a reused data dir keeps the caches)
    db_url = f"sqlite:///{db_path}"
    report: dict = {"model": model, "endpoint": endpoint, "weights": config.weights(),
                    "size": f"{config.size}x{config.size}", "steps": config.steps.get(model, "endpoint default"),
                    "acceleration": config.acceleration, "levels": {}, "added_latency_p50_s": None,
                    "added_latency_split_p50_s": None}

    def update() -> None:
        if on_update is not None:
            on_update(report)

    flags = [*config.weights_flags(), "--preload", model, "--db", db_url, "--storage",
             str(data_dir / f"files-{model}"), "--device", device]
    start = time.perf_counter()
    server, base, _ = start_server(str(data_dir), *flags, timeout=config.start_timeout_s, env=config.env(),
                                   log_path=str(data_dir / f"server-{model}.log"))
    samples_by_level: dict[int, list[Sample]] = {}
    warm: list[Sample] = []
    try:
        report["server"] = {"start_s": time.perf_counter() - start, "pid": server.pid}
        fluxserve.compat.fal.use(base)
        index = 0
        warm, _ = drive(endpoint, [(i, arguments(config, model, i)) for i in range(config.warmup)], 1, config)
        index += config.warmup
        report["warmup"] = {"latency_s": [s.latency_s for s in warm], "errors": [s.error for s in warm if s.error]}
        update()
        for concurrency in config.concurrency:
            bodies = [(i, arguments(config, model, i)) for i in range(index, index + config.requests)]
            index += config.requests
            with GpuSampler(device) as gpu:
                samples, wall = drive(endpoint, bodies, concurrency, config)
            samples_by_level[concurrency] = samples
            report["levels"][str(concurrency)] = {"concurrency": concurrency, **level_stats(samples, wall,
                                                                                            gpu.result())}
            update()
        report["server"]["health"] = _health(base)
    finally:
        report.setdefault("server", {})["exit_status"] = stop_server(server)
    jobs = stored_jobs(db_url, endpoint)
    if 1 in samples_by_level:
        one = report["levels"]["1"]
        report["added_latency_p50_s"] = one["wait_p50_s"]
        report["added_latency_split_p50_s"] = latency_split(samples_by_level[1], jobs)
    update()

    measured = [s for level in config.concurrency for s in samples_by_level.get(level, []) if s.error is None]
    chosen = [s for s in warm if s.error is None] + measured[:config.engine_requests]
    requests = [jobs[s.prompt].request for s in chosen if s.prompt in jobs]
    warm_count = sum(1 for s in warm if s.error is None and s.prompt in jobs)
    if len(requests) <= warm_count:
        raise RuntimeError(f"no completed request of {model} to replay through the engine alone")
    alone = run_engine_replay(config, device, requests, warm_count, data_dir, f"engine-{model}")
    report["engine_alone"] = alone
    report["device"] = alone["device"]
    engine_rate = alone["images_per_s"]
    for row in report["levels"].values():
        row["engine_images_per_s"] = engine_rate
        row["vs_engine"] = row["images_per_s"] / engine_rate if row["images_per_s"] and engine_rate else None
    best = max((row for row in report["levels"].values() if row["images_per_s"]),
               key=lambda row: row["images_per_s"], default=None)
    report["saturation"] = {
        "concurrency": best["concurrency"] if best else None,
        "images_per_s": best["images_per_s"] if best else None,
        "engine_images_per_s": engine_rate,
        "vs_engine": best["vs_engine"] if best else None,
    }
    report["targets"] = targets(report)
    report["placement_matches"] = _same_placement(report, model)
    update()
    return report


def targets(report: dict) -> dict:
    """The two targets, each with the number it was judged on (None: not measured)."""
    vs = (report.get("saturation") or {}).get("vs_engine")
    added = report.get("added_latency_p50_s")
    return {
        "saturation_vs_engine": {"value": vs, "target": f">= {SATURATION_TARGET}",
                                 "met": vs >= SATURATION_TARGET if vs is not None else None},
        "added_latency_p50_s": {"value": added, "target": f"<= {ADDED_LATENCY_TARGET_S}",
                                "met": added <= ADDED_LATENCY_TARGET_S if added is not None else None},
    }


def _health(base: str) -> dict | None:
    import httpx

    try:
        return httpx.get(f"{base}/health", timeout=10, trust_env=False).json()
    except (httpx.HTTPError, ValueError):
        return None


def _same_placement(report: dict, model: str) -> bool | None:
    """Whether the server and the engine alone held the model alike (same plan, precisions and level)."""
    def held(placement: dict | None) -> tuple | None:
        info = ((placement or {}).get("models") or {}).get(model)
        return (info.get("transformer"), info.get("text_encoder"), info.get("summary")) if info else None

    health = (report.get("server") or {}).get("health") or {}
    server = held((health.get("placement") or [None])[0])
    alone = held((report.get("engine_alone") or {}).get("placement"))
    return None if server is None or alone is None else server == alone


def default_device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def describe_client(config: LoadConfig) -> dict:
    from importlib.metadata import version

    return {"library": f"fal-client {version('fal-client')}", "call": config.call,
            "poll_interval_s": config.poll_interval if config.call == "subscribe" else None,
            "threads": "one fal_client.SyncClient per concurrent client, closed loop",
            "machine": f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores"}


def run_benchmark(config: LoadConfig, data_dir: Path, on_update: Callable[[dict], None] | None = None) -> dict:
    """Every model of ``config``, one after the other (one server and one engine-alone process each, sharing
    ``data_dir``: the demo weights and the compiler caches are made once)."""
    report = {"definition": __doc__.split("\n\n", 1)[0].replace("\n", " "), "config": asdict(config),
              "client": describe_client(config), "models": {}}
    for model in config.models:
        def save(row: dict, model: str = model) -> None:
            report["models"][model] = row
            if on_update is not None:
                on_update(report)

        save(measure_model(config, model, data_dir, on_update=save))
    return report


# ---- output ---------------------------------------------------------------------------------------------------
def _fmt(value: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value * scale:.{digits}g}"


def format_report(report: dict) -> str:
    lines = []
    for model, row in report["models"].items():
        device = row.get("device") or {}
        lines.append(f"{model} ({row['endpoint']}) {row['size']}, steps {row['steps']}, {row['weights']}, on "
                     f"{device.get('name', '?')} ({device.get('type', '?')}); client {report['client']['call']}")
        alone = row.get("engine_alone") or {}
        lines.append(f"  engine alone: {_fmt(alone.get('images_per_s'))} images/s over {alone.get('requests')} "
                     f"requests (inference p50 {_fmt((alone.get('stages_p50_s') or {}).get('inference'))} s)")
        for level in row["levels"].values():
            busy = level["gpu_busy"]
            lines.append(
                f"  c={level['concurrency']}: {_fmt(level['images_per_s'])} images/s "
                f"({_fmt(level['vs_engine'], 100)}% of the engine alone), p50 {_fmt(level['p50_s'])} s, p95 "
                f"{_fmt(level['p95_s'])} s, wait p50 {_fmt(level['wait_p50_s'], 1000)} ms, GPU busy: NVML "
                f"{_fmt(busy['nvml'], 100)}%, engine seconds/wall {_fmt(busy['engine_seconds_over_wall'], 100)}%"
                + (f"; {level['errors']} error(s): {level['first_error']}" if level["errors"] else ""))
        split = row.get("added_latency_split_p50_s") or {}
        lines.append(f"  added latency p50 at c=1: {_fmt(row.get('added_latency_p50_s'), 1000)} ms ("
                     + ", ".join(f"{k.removesuffix('_s')} {_fmt(v, 1000)} ms" for k, v in split.items()) + ")")
        for name, target in (row.get("targets") or {}).items():
            met = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
            lines.append(f"  target {name} {target['target']}: {_fmt(target['value'])} ({met})")
    return "\n".join(lines)


# ---- the command ----------------------------------------------------------------------------------------------
def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers >= 1")
    return values


def _models(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    if not names or any(name not in ENDPOINTS for name in names):
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(ENDPOINTS)}")
    return names


def _steps(text: str) -> dict[str, int]:
    out = {}
    for item in filter(None, (v.strip() for v in text.split(","))):
        name, _, steps = item.partition("=")
        if name not in ENDPOINTS or not steps.isdigit():
            raise argparse.ArgumentTypeError(f"--steps {item!r}: expected MODEL=N with MODEL in {', '.join(ENDPOINTS)}")
        out[name] = int(steps)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=_models, default=("klein-4b", "dev"), help="default klein-4b,dev")
    parser.add_argument("--concurrency", type=_ints, default=(1, 2, 4, 8), help="client levels (default 1,2,4,8)")
    parser.add_argument("--requests", type=int, default=16, help="measured requests per level (default 16)")
    parser.add_argument("--warmup", type=int, default=2, help="requests first, not counted (default 2)")
    parser.add_argument("--size", type=int, default=None,
                        help="square image side (default 1024 on a GPU, 512 with --demo: fal's smallest)")
    parser.add_argument("--steps", type=_steps, default={}, metavar="MODEL=N,...",
                        help="denoising steps per model (default: the endpoint's, 4 for klein, 28 for dev)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--demo", action="store_true", help="the demo models (the default without CUDA)")
    weights.add_argument("--random-weights", action="store_true",
                         help="random weights of the full-size architectures (the default with CUDA; the server "
                         "refuses them without)")
    parser.add_argument("--device", default="", help="the server's device (default: cuda when available)")
    parser.add_argument("--acceleration", choices=["none", "regular", "high"], default="regular")
    parser.add_argument("--call", choices=["run", "subscribe"], default="run",
                        help="fal_client.run (default) or subscribe (queue + status polls)")
    parser.add_argument("--poll-interval", type=float, default=0.1, help="subscribe's poll interval (s)")
    parser.add_argument("--engine-requests", type=int, default=None,
                        help="measured requests replayed through the engine alone (default: --requests)")
    parser.add_argument("--cpu-threads", type=int, help="OMP_NUM_THREADS of the server and the engine alone "
                        "(default: torch's; 1 keeps a busy CPU machine from slowing the demo models' many small "
                        "operations down by an order of magnitude)")
    parser.add_argument("--data-dir", help="where the servers' data go (default: a temporary directory)")
    parser.add_argument("--json", dest="json_out", metavar="OUT", help="write the report as JSON")
    parser.add_argument("--engine-replay", metavar="REQUESTS_JSON", help=argparse.SUPPRESS)
    parser.add_argument("--engine-warmup", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="fluxserve-serving-"))
    if args.engine_replay:  # the engine-alone process of run_engine_replay
        result = engine_replay(json.loads(Path(args.engine_replay).read_text()), args.engine_warmup,
                               data_dir=data_dir, demo=args.demo, device=args.device)
        Path(args.json_out).write_text(json.dumps(result, indent=2, default=str) + "\n")
        return 0
    import torch

    demo = args.demo or (not args.random_weights and not torch.cuda.is_available())
    if args.requests < 1 or args.warmup < 0:
        parser.error("--requests must be >= 1 and --warmup >= 0")
    config = LoadConfig(models=args.models, concurrency=args.concurrency, requests=args.requests,
                        warmup=args.warmup, size=args.size or (512 if demo else 1024), steps=args.steps, demo=demo,
                        device=args.device, acceleration=args.acceleration, call=args.call,
                        poll_interval=args.poll_interval, cpu_threads=args.cpu_threads,
                        engine_requests=args.engine_requests if args.engine_requests is not None else args.requests)
    loopback_only(os.environ)

    def save(report: dict) -> None:
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(report, indent=2, default=str) + "\n")

    report = run_benchmark(config, data_dir, on_update=save)
    save(report)
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
