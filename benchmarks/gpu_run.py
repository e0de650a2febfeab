"""fluxserve on a GPU: the numbers that matter, in one command, inside a time budget.

    python3 benchmarks/gpu_run.py [--tiny] [--budget SECONDS] [--parts NAME,...] OUT_DIR

The parts (modules of ``benchmarks/gpu_parts``) run in the order given, most important first by default; each
writes its own JSON into OUT_DIR as soon as it has something to write (partial results as they come), and
``summary.json`` lists every part with its status, seconds and headline numbers. benchmarks/README.md says what
each part measures.

The budget (``--budget``, default 510 s) is checked before every part and every sub-step against a generous
estimate of its cost; what does not fit is skipped and the summary says why. Every part and sub-step runs in
its own ``try``: an error is recorded with its traceback and the run goes on. Exit status 0 when no part
failed, 1 otherwise.

``--tiny`` runs the very same code on the CPU with tiny models of the same structure (64x64, 2 steps): FP8
matrix products and the non-native attention kernels are recorded as not supported there. CI runs it.

Nothing here touches a network: random weights, locally built tokenizers, ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
if (SRC / "fluxserve").is_dir() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from gpu_parts.common import (
    GPU_SCALE,
    START,
    TINY_SCALE,
    Budget,
    Run,
    allocated_gib,
    error_record,
    free_memory,
    log,
    write_json,
)
from gpu_parts.dev import RUNS as DEV_RUNS

DEFAULT_BUDGET_S = 510.0
# most important first: what the next GPU run must measure, in the order of its value
PARTS = ("checks", "dev", "klein", "serving", "whole_request", "kernels", "attention", "lossless", "vae", "encoding",
         "train")


class Terminated(BaseException):
    """SIGTERM arrived: unwinds through the parts (which record errors, not this) to ``main``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def load_parts(names: tuple[str, ...]) -> dict[str, Any]:
    """The part modules of ``gpu_parts`` by name (imported before torch is: they import it inside functions)."""
    return {name: importlib.import_module(f"gpu_parts.{name}") for name in names}


def all_estimates(tiny: bool) -> dict[str, float]:
    """Every part's estimates for the mode, from the part modules' ``ESTIMATES``."""
    table: dict[str, float] = {}
    for module in load_parts(PARTS).values():
        table.update(module.ESTIMATES["tiny" if tiny else "gpu"])
    return table


def run_part(run: Run, name: str) -> None:
    """Run one part when its estimate fits: its JSON is written as it goes and when it ends, the summary before
    it starts (status running) and after; an error is recorded with its traceback and the run goes on."""
    entry: dict = {"file": f"{name}.json", "estimate_s": run.estimate(name)}
    run.summary["parts"][name] = entry
    reason = run.budget.shortfall(run.estimate(name))
    if reason:
        entry.update(status="skipped", skipped=reason, seconds=0.0, file=None)
        log(f"== {name}: skipped ({reason})")
        run.save_summary()
        return
    entry.update(status="running", started_at_s=round(run.budget.elapsed(), 1))
    run.save_summary()
    log(f"== {name}: start ({run.budget.left():.0f} s left)")
    report: dict = {"part": name, "status": "running"}
    start = time.perf_counter()
    try:
        entry["headline"] = load_parts((name,))[name].part(run, report)
        failed = sorted(report.get("errors", {}))
        entry["status"] = "failed" if failed else "ok"
        if failed:
            entry["error"] = "; ".join(f"{step}: {report['errors'][step]['error'][:300]}" for step in failed)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - recorded (a library's exit too), and the run goes on
        record = error_record(exc)
        report.update(record)
        entry.update(status="failed", error=record["error"][:500])
        log(f"== {name}: FAILED: {record['error'][:300]}")
    if report.get("skipped"):
        entry["skipped_steps"] = report["skipped"]
    entry["seconds"] = round(time.perf_counter() - start, 1)
    report["status"] = entry["status"]
    report["part_seconds"] = entry["seconds"]
    run.save(name, report)
    free_memory(run.device)
    entry["allocated_gib_after"] = allocated_gib(run.device)
    run.save_summary()
    log(f"== {name}: {entry['status']} in {entry['seconds']:.1f} s")


def _estimate(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    if name not in all_estimates(tiny=False):
        raise argparse.ArgumentTypeError(f"--estimate {text!r}: unknown name {name!r}")
    try:
        return name, float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--estimate {text!r}: expected NAME=SECONDS") from None


def _names(flag: str, allowed: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    """The argparse type of a comma-separated list of ``allowed`` names (``flag`` names it in errors)."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(name.strip() for name in text.split(",") if name.strip())
        if not names or any(name not in allowed for name in names):
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: choose from {', '.join(allowed)}")
        return names

    return parse


def unbundle(bundle: Path, out: Path) -> int:
    """The files a ``--bundle`` run kept, written into ``out`` as the run wrote them."""
    import json

    files = json.loads(bundle.read_text())["files"]
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if Path(name).name != name or not name.endswith(".json"):
            raise SystemExit(f"{bundle}: not a file name of a run: {name!r}")
        write_json(out / name, data)
    print(f"{len(files)} files written to {out}: {', '.join(sorted(files))}")
    return 0


def prepare_environment() -> Path:
    """No network, and compiler caches outside OUT_DIR (only a few files come back from it). Set before torch,
    diffusers and transformers are imported."""
    work = Path(os.environ.get("FLUXSERVE_GPU_RUN_WORK") or Path(tempfile.gettempdir()) / "fluxserve-gpu-run")
    work.mkdir(parents=True, exist_ok=True)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        os.environ[key] = "1"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "torchinductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(work / "triton"))
    return work


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where the JSON files go (created)")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU: the same code paths, for CI")
    parser.add_argument("--bundle", metavar="FILE", type=Path,
                        help="also keep every JSON file of the run in this one file, rewritten as they are (for "
                             "machines that return few files); --unbundle FILE OUT_DIR writes them out again")
    parser.add_argument("--unbundle", metavar="FILE", type=Path,
                        help="write the files of a --bundle FILE into OUT_DIR, then exit (nothing is measured)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for the whole run, start-up included (default {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--parts", type=_names("--parts", PARTS), default=PARTS, metavar="NAME,...",
                        help=f"which parts to run, in this order (default {','.join(PARTS)})")
    parser.add_argument("--dev-levels", type=_names("--dev-levels", DEV_RUNS), default=DEV_RUNS,
                        metavar="LEVEL,...",
                        help=f"the acceleration levels and high's variants the dev part runs, in order (default "
                             f"{','.join(DEV_RUNS)}; none first: the others' error is against it; the variants "
                             "after high)")
    parser.add_argument("--estimate", action="append", default=[], metavar="NAME=SECONDS", type=_estimate,
                        help="override the estimated cost of a part or sub-step (e.g. dev.high=150 on a slower "
                             f"GPU); names: {', '.join(all_estimates(tiny=False))}")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    if args.unbundle:
        return unbundle(args.unbundle, out)
    out.mkdir(parents=True, exist_ok=True)
    work = prepare_environment()
    budget = Budget(args.budget, START)
    faulthandler.dump_traceback_later(args.budget + 30, exit=False)  # a hang shows its stacks in the log

    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    logging.getLogger("fluxserve").setLevel(logging.INFO)
    import torch

    tiny = args.tiny
    if not tiny and not torch.cuda.is_available():
        log("no CUDA device: run with --tiny for the CPU check, or on a GPU machine")
        return 2
    device = torch.device("cpu") if tiny else torch.device("cuda")
    dtype = torch.float32 if tiny else torch.bfloat16  # what the engine loads on each device
    name = "cpu (tiny models)" if tiny else torch.cuda.get_device_name(device)
    run = Run(out=out, tiny=tiny, budget=budget, scale=TINY_SCALE if tiny else GPU_SCALE, device=device,
              dtype=dtype, work_dir=work, device_name=name, defaults=all_estimates(tiny), estimates=dict(args.estimate),
              dev_levels=args.dev_levels, bundle=args.bundle)
    run.summary = {
        "run": {"mode": "tiny (CPU)" if tiny else "gpu", "device": name, "budget_s": args.budget,
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv, "torch": torch.__version__,
                "python": platform.python_version(), "work_dir": str(work),
                "resolution": f"{run.scale.width}x{run.scale.height}", "klein_steps": run.scale.klein_steps,
                "estimates_overridden": dict(args.estimate), "parts": list(args.parts),
                "dev_levels": list(args.dev_levels), "attention_override": os.environ.get("FLUXSERVE_ATTENTION")},
        "parts": {},
        "finished": False,
    }
    log(f"fluxserve GPU run on {name}: budget {args.budget:.0f} s, {budget.left():.0f} s left after start-up; "
        f"OUT_DIR {out}")

    def on_term(signum, _frame):
        run.summary["terminated"] = f"signal {signum} at +{budget.elapsed():.0f} s"
        run.save_summary()
        log(f"terminated by signal {signum}")
        raise Terminated(signum)  # not caught by the parts: their cleanup runs (a server is stopped), then we exit

    signal.signal(signal.SIGTERM, on_term)
    try:
        for part in args.parts:
            run_part(run, part)
    except Terminated as stop:
        return 128 + stop.signum
    run.summary["finished"] = True
    run.save_summary()
    faulthandler.cancel_dump_traceback_later()
    statuses = {part: entry["status"] for part, entry in run.summary["parts"].items()}
    log(f"done in {budget.elapsed():.0f} s: {statuses}")
    return 1 if "failed" in statuses.values() else 0


if __name__ == "__main__":
    sys.exit(main())