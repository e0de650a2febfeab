"""The GPU memory cap: the arithmetic of what the planner sees under it, the setting, its flag and environment
variable, and that every decision made from GPU memory reads it through ``memory.free_gpu_bytes``.

There is no GPU here: where a decision is only made on CUDA, ``memory.free_gpu_bytes`` (the one reading of GPU
memory) or torch's CUDA memory queries are replaced by fixed figures, and the test checks that the decision
follows them."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fluxserve.cli import build_parser
from fluxserve.commands.common import add_model_flags, memory_flag, settings_from_args
from fluxserve.config import Settings, memory_size
from fluxserve.engine import memory, placement, plan, random_weights

GIB = 1024**3
ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda:0")


# ---- the arithmetic ---------------------------------------------------------------------------------------------
def test_without_a_cap_the_planner_sees_the_driver_plus_the_allocators_unused_reserve():
    assert memory.capped_memory(100 * GIB, 140 * GIB) == (100 * GIB, 140 * GIB)
    assert memory.capped_memory(100 * GIB, 140 * GIB, reserved=30 * GIB, allocated=20 * GIB) == (110 * GIB,
                                                                                                  140 * GIB)
    # a cap at or above the GPU's memory changes nothing
    assert memory.capped_memory(100 * GIB, 140 * GIB, cap=140 * GIB) == (100 * GIB, 140 * GIB)
    assert memory.capped_memory(100 * GIB, 140 * GIB, cap=200 * GIB) == (100 * GIB, 140 * GIB)


def test_under_a_cap_the_planner_sees_the_smaller_gpu():
    t, c = 140 * GIB, 80 * GIB
    # a fresh process: the CUDA context (1 GiB) stays used, as it would on the smaller GPU
    assert memory.capped_memory(139 * GIB, t, cap=c) == (79 * GIB, c)
    # 30 GiB reserved by PyTorch, 20 of them in use: 109 GiB free at the driver
    assert memory.capped_memory(109 * GIB, t, reserved=30 * GIB, allocated=20 * GIB, cap=c) == (59 * GIB, c)
    # never more than the allocator may still reserve under the fraction (cap - reserved)
    assert memory.capped_memory(t, t, reserved=10 * GIB, allocated=10 * GIB, cap=c) == (70 * GIB, c)
    # another process holds most of the GPU: nothing is left under the cap but the unused reserve
    assert memory.capped_memory(50 * GIB, t, reserved=2 * GIB, allocated=1 * GIB, cap=c) == (1 * GIB, c)
    # more already reserved than the cap: nothing new to reserve
    assert memory.capped_memory(40 * GIB, t, reserved=90 * GIB, allocated=90 * GIB, cap=c) == (0, c)


# ---- the setting, the flag, the environment variable ------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [("80GiB", 80 * GIB), ("80 GiB", 80 * GIB), ("80g", 80 * GIB),
                                            ("80GB", 80 * 10**9), ("141", 141 * GIB), ("0.5GiB", GIB // 2),
                                            ("0", 0)])
def test_memory_sizes(text, expected):
    assert memory_size(text, "--gpu-memory-cap") == expected


@pytest.mark.parametrize("text", ["80XB", "eighty", "-8GiB", "80 GiB 2", ""])
def test_a_bad_size_names_the_flag(text):
    with pytest.raises(ValueError, match=re.escape(f"--gpu-memory-cap {text!r}: expected a size like 80GiB")):
        memory_size(text, "--gpu-memory-cap")
    with pytest.raises(argparse.ArgumentTypeError, match="--gpu-memory-cap"):
        memory_flag("--gpu-memory-cap")(text)


@pytest.mark.parametrize("command", ["serve", "worker", "bench", "generate"])
def test_the_commands_that_run_an_engine_take_the_flag(command, tmp_path, capsys):
    extra = {"bench": ["--model", "dev"], "generate": ["a fox"]}.get(command, [])
    args = build_parser().parse_args([command, *extra, "--gpu-memory-cap", "80GiB", "--data-dir", str(tmp_path)])
    assert args.gpu_memory_cap == 80 * GIB
    assert settings_from_args(args).gpu_memory_cap == 80 * GIB
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([command, *extra, "--gpu-memory-cap", "80XB"])
    assert exited.value.code == 2
    assert "argument --gpu-memory-cap: --gpu-memory-cap '80XB': expected a size like 80GiB" in capsys.readouterr().err


def test_the_environment_variable_and_the_flag_over_it(monkeypatch, tmp_path):
    parser = argparse.ArgumentParser()
    add_model_flags(parser)
    assert Settings.from_env().gpu_memory_cap == 0  # no cap unless asked for
    monkeypatch.setenv("FLUXSERVE_GPU_MEMORY_CAP", "80GiB")
    assert Settings.from_env().gpu_memory_cap == 80 * GIB
    assert settings_from_args(parser.parse_args([])).gpu_memory_cap == 80 * GIB
    assert settings_from_args(parser.parse_args(["--gpu-memory-cap", "40GiB"])).gpu_memory_cap == 40 * GIB
    assert settings_from_args(parser.parse_args(["--gpu-memory-cap", "0"])).gpu_memory_cap == 0  # lifted
    monkeypatch.setenv("FLUXSERVE_GPU_MEMORY_CAP", "lots")
    with pytest.raises(SystemExit, match=re.escape("fluxserve: FLUXSERVE_GPU_MEMORY_CAP 'lots': expected a size")):
        settings_from_args(parser.parse_args([]))


# ---- applying it ------------------------------------------------------------------------------------------------
def test_on_the_cpu_the_cap_is_accepted_and_ignored_with_a_note(tmp_path, catalog):
    from fluxserve.engine import Engine

    record = memory.apply_memory_cap("cpu", 80 * GIB)
    assert not record.applied and "ignored: cpu is not a GPU" in record.note
    engine = Engine(Settings(data_dir=tmp_path, device="cpu", demo=True, gpu_memory_cap=80 * GIB), catalog)
    assert not engine.memory_cap.applied
    cap = engine.placement()["memory"]["cap"]
    assert cap["requested_gib"] == 80 and cap["applied"] is False and "not a GPU" in cap["note"]
    assert "cap" not in Engine(Settings(data_dir=tmp_path, device="cpu", demo=True), catalog).placement()["memory"]


def test_the_generate_command_runs_on_the_cpu_with_a_cap_and_says_it_is_ignored(demo_data_dir, tmp_path):
    out = tmp_path / "fox.png"
    done = subprocess.run([sys.executable, "-m", "fluxserve", "generate", "a fox", "--demo", "--size", "512x512",
                           "--steps", "1", "--gpu-memory-cap", "80GiB", "-o", str(out), "--data-dir",
                           str(demo_data_dir)], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert out.exists() and "GPU memory cap (80.0 GiB, --gpu-memory-cap) is ignored: cpu is not a GPU" in done.stderr


class FakeCuda:
    """torch's CUDA memory queries and the fraction setter with fixed figures (no GPU here), recording the
    fraction the cap sets."""

    def __init__(self, monkeypatch, *, free: int, total: int, reserved: int = 0, allocated: int = 0) -> None:
        self.free, self.total, self.reserved, self.allocated = free, total, reserved, allocated
        self.fractions: list[tuple[float, int]] = []
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (self.free, self.total))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: self.reserved)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: self.allocated)
        monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                            lambda fraction, device=None: self.fractions.append((fraction, device)))


def test_the_cap_sets_the_fraction_and_free_gpu_bytes_sees_it(monkeypatch):
    cuda = FakeCuda(monkeypatch, free=139 * GIB, total=140 * GIB, reserved=2 * GIB, allocated=1 * GIB)
    try:
        assert memory.free_gpu_bytes(CUDA) == (140 * GIB, 140 * GIB)  # 139 free + 1 unused reserve
        record = memory.apply_memory_cap(CUDA, 80 * GIB)
        assert record.applied and record.fraction == pytest.approx(80 / 140)
        assert cuda.fractions == [(pytest.approx(80 / 140), 0)]
        assert "set_per_process_memory_fraction(0.571429, 0)" in record.how
        assert memory.memory_cap(CUDA) == 80 * GIB
        # min(139 - 60, 80 - 2) = 78 GiB the allocator may still get, + 1 GiB unused reserve
        assert memory.free_gpu_bytes(CUDA) == (79 * GIB, 80 * GIB)
        report = memory.memory_report(CUDA)
        assert report["free_gib"] == 79 and report["total_gib"] == 80 and report["cap_gib"] == 80
        lifted = memory.apply_memory_cap(CUDA, 0)
        assert not lifted.applied and cuda.fractions[-1] == (1.0, 0) and memory.memory_cap(CUDA) == 0
        assert memory.free_gpu_bytes(CUDA) == (140 * GIB, 140 * GIB)
        # a cap the GPU is smaller than changes nothing
        assert not memory.apply_memory_cap(CUDA, 200 * GIB).applied and memory.memory_cap(CUDA) == 0
    finally:
        memory._caps.clear()


# ---- every decision reads GPU memory through memory.free_gpu_bytes ------------------------------------------------
@pytest.fixture(scope="module")
def dev_sizes() -> dict[str, int]:
    return random_weights.meta_sizes(random_weights.build_meta_pipeline("dev"))


class SeenMemory:
    """``memory.free_gpu_bytes`` replaced by fixed (free, total) figures, counting its calls."""

    def __init__(self, monkeypatch) -> None:
        self.free, self.total, self.calls = 0, 0, 0
        monkeypatch.setattr(memory, "free_gpu_bytes", self)

    def set(self, gib: float) -> SeenMemory:
        self.free = self.total = int(gib * GIB)
        return self

    def __call__(self, device) -> tuple[int, int]:
        assert torch.device(device).type == "cuda"
        self.calls += 1
        return self.free, self.total


def test_the_placement_plan_follows_free_gpu_bytes(monkeypatch, dev_sizes):
    seen = SeenMemory(monkeypatch).set(8)
    with pytest.raises(plan.DoesNotFit, match="8.0 GiB of free GPU memory"):
        placement.plan_for(CUDA, dev_sizes)
    assert seen.calls == 1
    seen.set(80)
    capped = placement.plan_for(CUDA, dev_sizes)
    assert (capped.transformer, capped.text_encoder) == ("fp8", "fp8") and capped.free_bytes == 80 * GIB
    assert capped.reserve_bytes == plan.headroom_bytes(80 * GIB)  # working memory of an 80 GiB GPU
    forced = placement.plan_for(CUDA, dev_sizes, transformer="bf16")
    assert (forced.transformer, forced.text_encoder) == ("bf16", "stream")
    seen.set(139.8)
    whole = placement.plan_for(CUDA, dev_sizes)
    assert (whole.transformer, whole.text_encoder) == ("bf16", "resident")


def test_the_fp8_copy_of_high_follows_free_gpu_bytes(monkeypatch):
    from fluxserve.engine import accel

    transformer = random_weights.build_transformer("dev", "meta", arch=random_weights.tiny_architecture("dev"))
    need = accel.fp8_copy_bytes(transformer) + plan.headroom_bytes(8 * GIB)
    seen = SeenMemory(monkeypatch)
    seen.free, seen.total = need, 8 * GIB
    assert accel._fp8_room(transformer, CUDA)
    seen.free = need - 1
    assert not accel._fp8_room(transformer, CUDA)


def test_the_training_plan_follows_free_gpu_bytes(monkeypatch, tmp_path, catalog):
    from fluxserve.engine import Engine
    from fluxserve.engine.pipeline import LoadedModel

    pipe, placed = random_weights.build_placed_random_pipeline(
        "klein-4b", "cpu", torch.float32, arch=random_weights.tiny_architecture("klein-4b"))
    spec = catalog.models["klein-4b-base"]
    engine = Engine(Settings(data_dir=tmp_path, device="cuda", demo=True), catalog)  # no CUDA call without a cap
    placed.transformer = "bf16"
    loaded = LoadedModel(spec.key, spec, pipe, "random-weights", placed, 0.0)
    seen = SeenMemory(monkeypatch).set(80)
    roomy = engine._training_plan(loaded, 256, 4, 0)
    assert roomy.free_bytes == 80 * GIB and roomy.reserve_bytes == plan.headroom_bytes(80 * GIB)
    seen.set(4)  # less than the working memory alone
    with pytest.raises(plan.DoesNotFit, match="4.0 GiB is free"):
        engine._training_plan(loaded, 256, 4, 0)
    assert engine.placement()["memory"]["total_gib"] == 4  # the engine's memory report reads it too


def test_the_benchmarks_fit_checks_follow_free_gpu_bytes(monkeypatch, dev_sizes):
    from fluxserve import bench

    seen = SeenMemory(monkeypatch).set(139.8)
    assert random_weights.resident_plan("dev", dev_sizes, CUDA).free_bytes == seen.free
    seen.set(80)
    with pytest.raises(random_weights.RandomWeightsUnavailable, match="80.0 GiB free"):
        random_weights.resident_plan("dev", dev_sizes, CUDA)
    pipe = random_weights.build_meta_pipeline("klein-4b", arch=random_weights.tiny_architecture("klein-4b"))
    assert bench._fits(pipe, CUDA)
    seen.free = 1  # less than the working memory
    assert not bench._fits(pipe, CUDA)


def test_plan_on_a_gpu_plans_from_free_gpu_bytes_and_prints_what_plan_gpu_memory_prints(monkeypatch, capsys):
    from fluxserve.cli import main

    assert main(["plan", "--gpu-memory", "80GiB", "--model", "dev"]) == 0
    explicit = capsys.readouterr().out
    monkeypatch.setenv("FLUXSERVE_GPU_MEMORY_CAP", "40GiB")  # an explicit --gpu-memory is not capped
    assert main(["plan", "--gpu-memory", "80GiB", "--model", "dev"]) == 0
    assert capsys.readouterr().out == explicit
    monkeypatch.delenv("FLUXSERVE_GPU_MEMORY_CAP")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    SeenMemory(monkeypatch).set(80)
    assert main(["plan", "--model", "dev"]) == 0
    assert capsys.readouterr().out == explicit
    assert "transformer FP8, text encoder FP8" in explicit


def test_nothing_reads_gpu_memory_but_memory_free_gpu_bytes():
    """The structural half: no other module asks the driver for free memory, and nobody keeps the old name."""
    offenders = []
    for path in (ROOT / "src" / "fluxserve").rglob("*.py"):
        text = path.read_text()
        if "mem_get_info" in text and path.name != "memory.py":
            offenders.append(f"{path.name}: mem_get_info")
        if re.search(r"placement import .*free_gpu_bytes|placing\.free_gpu_bytes|placement\.free_gpu_bytes", text):
            offenders.append(f"{path.name}: free_gpu_bytes from placement")
    for path in (ROOT / "benchmarks").rglob("*.py"):
        text = path.read_text()
        if re.search(r"free, total = torch\.cuda\.mem_get_info", text) and path.name != "checks.py":
            offenders.append(f"{path.name}: plans from mem_get_info")
    assert offenders == []
