"""The Triton kernels themselves, run by Triton's interpreter on the CPU.

Triton fixes at ``@triton.jit`` time whether a kernel is interpreted, so these tests need ``TRITON_INTERPRET=1``
before the kernel modules are imported: run in a normal session, this module re-runs itself in a subprocess
with the variable set (one test here stands for all of them; run it directly with ``TRITON_INTERPRET=1`` to see
each). The interpreter rounds its own way (bf16 truncates, its float8 cast has a carry quirk): the references
are computed with those numerics (triton_numerics.py), so the float8 values and the scales must match bit for
bit, and a deliberately wrong scale fails them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

if not INTERPRETED:

    def test_the_kernels_under_the_triton_interpreter():
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
            env=env, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parent.parent, check=False,
        )
        summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
        assert done.returncode == 0 and " passed" in summary and "skipped" not in summary, (
            done.stdout[-6000:] + done.stderr[-3000:])

else:
    import triton
    import triton.language as tl
    from kernel_helpers import (
        FluxserveOps,
        assert_same_rows,
        bits,
        model_inputs,
        rel,
        tiny_transformer,
    )
    from triton_numerics import INTERPRETER

    from fluxserve.engine import accel, blocks, fp8
    from fluxserve.engine.kernels import norm_quant, ops, qk_rope, runtime, swiglu_quant

    @triton.jit
    def _cast_kernel(x_ptr, bf16_ptr, fp8_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        mask = offsets < n
        x = tl.load(x_ptr + offsets, mask=mask)
        tl.store(bf16_ptr + offsets, x.to(tl.bfloat16), mask=mask)
        tl.store(fp8_ptr + offsets, x.to(tl.float8e4nv), mask=mask)

    def test_the_kernels_run_interpreted():
        assert runtime.INTERPRETED and runtime.triton_runs_on(torch.device("cpu"))
        assert type(swiglu_quant._swiglu_quant_kernel).__name__ == "InterpretedFunction"

    def test_interpreter_numerics_mirror_the_interpreter():
        g = torch.Generator().manual_seed(0)
        binades = torch.arange(-24, 9).float()  # e4m3 subnormals up to its largest binade
        x = ((1 + torch.rand(binades.numel(), 64, generator=g)) * 2 ** binades[:, None]).flatten()
        halves = (torch.arange(16) / 16 + 1)[None, :] * 2 ** binades[:, None]  # ties and carries
        x = torch.cat([x, halves.flatten(), torch.tensor([0.0, 448.0, 2**-9, 3 * 2**-10])])
        x = torch.cat([x, -x])
        x = x[x.abs() <= 448]
        out_bf16 = torch.empty(x.numel(), dtype=torch.bfloat16)
        out_fp8 = torch.empty(x.numel(), dtype=torch.float8_e4m3fn)
        _cast_kernel[(1,)](x, out_bf16, out_fp8, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
        assert torch.equal(bits(out_bf16), bits(INTERPRETER.cast(x, torch.bfloat16)))
        assert torch.equal(bits(out_fp8), bits(INTERPRETER.cast(x, torch.float8_e4m3fn)))
        # why the mirror is needed: the interpreter differs from round-to-nearest casts
        assert not torch.equal(bits(out_bf16), bits(x.to(torch.bfloat16)))
        assert not torch.equal(bits(out_fp8), bits(x.to(torch.float8_e4m3fn)))

    def test_a_failing_kernel_falls_back_to_its_reference(monkeypatch):
        attn, mlp = _swiglu_inputs("odd-rows")

        def broken(*args):
            raise RuntimeError("cannot compile")

        monkeypatch.setattr(swiglu_quant, "launch", broken)
        monkeypatch.setattr(runtime, "_failure", None)
        assert_same_rows(ops.swiglu_quant_rows(attn, mlp), swiglu_quant.reference(attn, mlp))
        assert runtime.failure() == "RuntimeError: cannot compile"
        assert not runtime.triton_runs_on(torch.device("cpu"))
        assert "a Triton kernel failed here" in runtime.unavailable_reason(torch.device("cpu"))

    # ---- (a) SwiGLU + concat + quantisation ---------------------------------------------------------------
    SWIGLU_CASES = {
        # name: (batch, tokens, heads, head_dim, mlp, attention layout)
        "single-block": (2, 13, 3, 16, 40, "transposed"),
        "odd-rows": (1, 7, 2, 8, 24, "contiguous"),
        "wider-than-a-block": (1, 3, 1, 40, 2500, "flat-slice"),
    }

    def _swiglu_inputs(case: str, dtype=torch.bfloat16):
        batch, tokens, heads, head_dim, mlp, layout = SWIGLU_CASES[case]
        g = torch.Generator().manual_seed(len(case))
        inner = heads * head_dim
        proj = (torch.randn(batch, tokens, 3 * inner + 2 * mlp, generator=g) * 3).to(dtype)
        if layout == "transposed":  # (B, H, S, D) storage seen as (B, S, H, D), as SDPA returns it
            attn = torch.randn(batch, heads, tokens, head_dim, generator=g).to(dtype).transpose(1, 2)
        elif layout == "flat-slice":  # (B, S, C), a strided slice of a wider row
            attn = proj[..., 5 : 5 + inner]
        else:
            attn = torch.randn(batch, tokens, heads, head_dim, generator=g).to(dtype)
        return attn, proj[..., 3 * inner:]

    @pytest.mark.parametrize("case", list(SWIGLU_CASES))
    @pytest.mark.parametrize("parts", ["both", "attention", "mlp"])
    def test_swiglu_quant_kernel(case, parts):
        attn, mlp = _swiglu_inputs(case)
        attn = attn if parts != "mlp" else None
        mlp = mlp if parts != "attention" else None
        assert_same_rows(swiglu_quant.launch(attn, mlp), swiglu_quant.reference(attn, mlp, INTERPRETER))

    def test_a_wrong_scale_breaks_the_comparison(monkeypatch):
        attn, mlp = _swiglu_inputs("single-block")
        got = swiglu_quant.launch(attn, mlp)
        monkeypatch.setattr(runtime, "FP8_MAX", 440.0)
        with pytest.raises(AssertionError, match="differ"):
            assert_same_rows(got, swiglu_quant.reference(attn, mlp, INTERPRETER))

    # ---- (b) LayerNorm + modulation + quantisation ------------------------------------------------------
    @pytest.mark.parametrize("per_token", [False, True])
    @pytest.mark.parametrize("shape", [(2, 9, 48), (1, 5, 100)])
    def test_norm_quant_kernel(per_token, shape):
        batch, tokens, width = shape
        g = torch.Generator().manual_seed(width)
        x = (torch.randn(batch, tokens, width + 6, generator=g) * 2 + 0.5).to(torch.bfloat16)[..., 3 : 3 + width]
        temb = torch.randn(batch, tokens if per_token else 1, 6 * width, generator=g).to(torch.bfloat16)
        shift, scale = temb[..., :width], temb[..., width : 2 * width]  # strided, as Flux2Modulation.split gives
        got = norm_quant.launch(x, shift, scale, 1e-6)
        assert_same_rows(got, norm_quant.reference(x, shift, scale, 1e-6, INTERPRETER))

    def test_norm_quant_kernel_in_float32():
        """Without bf16 roundings to absorb them, float32 sums in another order show: the scales agree to a few
        float32 ulps and the float8 values (3 mantissa bits) do not move."""
        g = torch.Generator().manual_seed(3)
        x = torch.randn(2, 9, 48, generator=g) + 0.5
        shift, scale = torch.randn(2, 1, 48, generator=g), torch.randn(2, 1, 48, generator=g)
        (q, s), (ref_q, ref_s) = norm_quant.launch(x, shift, scale, 1e-6), norm_quant.reference(
            x, shift, scale, 1e-6, INTERPRETER)
        assert torch.allclose(s, ref_s, rtol=1e-6, atol=0)
        assert int((bits(q) != bits(ref_q)).sum()) <= q.numel() // 100

    # ---- (c) QK RMSNorm + RoPE ----------------------------------------------------------------------------
    def _rotary(tokens: int, head_dim: int):
        from diffusers.models.transformers.transformer_flux2 import Flux2PosEmbed

        ids = torch.stack([torch.zeros(tokens), torch.arange(tokens) // 5, torch.arange(tokens) % 5,
                           torch.arange(tokens) % 2], dim=-1)
        return Flux2PosEmbed(theta=2000, axes_dim=[head_dim // 4] * 4)(ids)

    def _qk_inputs(heads: int, head_dim: int, dtype=torch.bfloat16):
        g = torch.Generator().manual_seed(heads * head_dim)
        inner = heads * head_dim
        proj = (torch.randn(2, 11, 3 * inner + 20, generator=g) * 2).to(dtype)
        context_proj = (torch.randn(2, 4, 3 * inner, generator=g) * 2).to(dtype)
        q = proj[..., inner : 2 * inner].unflatten(-1, (-1, head_dim))  # k's columns: strided
        c_q = context_proj[..., :inner].unflatten(-1, (-1, head_dim))
        w = (torch.rand(head_dim, generator=g) + 0.5).to(dtype)
        c_w = (torch.rand(head_dim, generator=g) + 0.5).to(dtype)
        return q, w, c_q, c_w

    @pytest.mark.parametrize("heads,head_dim", [(3, 16), (2, 32)])
    @pytest.mark.parametrize("with_context", [False, True])
    @pytest.mark.parametrize("fp8_out", [False, True])
    def test_rms_norm_rope_kernel(heads, head_dim, with_context, fp8_out):
        q, w, c_q, c_w = _qk_inputs(heads, head_dim)
        context = (c_q, c_w) if with_context else (None, None)
        cos, sin = _rotary(q.shape[1] + (c_q.shape[1] if with_context else 0), head_dim)
        scale = qk_rope.fp8_scale_bound(w, c_w) if fp8_out else None
        got = qk_rope.launch(q, w, cos, sin, 1e-6, *context, fp8_scale=scale)
        want = qk_rope.reference(q, w, cos, sin, 1e-6, *context, fp8_scale=scale, numerics=INTERPRETER)
        assert got.is_contiguous() and got.shape == want.shape and got.dtype == want.dtype
        assert torch.equal(bits(got), bits(want))

    def test_rms_norm_rope_kernel_in_float32():
        q, w, c_q, c_w = _qk_inputs(3, 16, torch.float32)
        cos, sin = _rotary(q.shape[1] + c_q.shape[1], 16)
        got = qk_rope.launch(q, w, cos, sin, 1e-6, c_q, c_w)
        want = qk_rope.reference(q, w, cos, sin, 1e-6, c_q, c_w, numerics=INTERPRETER)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)

    # ---- the blocks on the kernels ------------------------------------------------------------------------
    def test_regular_on_the_kernels_equals_stock_diffusers():
        """float32, so no bf16 cast is involved: the kernels' RMSNorm + RoPE differ from PyTorch's only in the
        order of float32 operations."""
        transformer = tiny_transformer(torch.float32)
        kwargs = model_inputs(1, batch=1, side=4, text=3)
        with torch.no_grad():
            stock = transformer(**kwargs)[0]
            accel.fuse_qkv(transformer)
            blocks.install(transformer, blocks.BlockOptions("native", kernels=True))
            with FluxserveOps() as seen:
                ours = transformer(**kwargs)[0]
        assert seen.counts["rms_norm_rope"] == 2 * 4  # q and k in each of the four blocks
        assert runtime.failure() is None  # the kernels ran, not the references
        assert rel(ours, stock) <= 1e-5

    def test_high_on_the_kernels_equals_the_unfused_w8a8_path(monkeypatch):
        """The fused ops and FP8Linear's own quantisation compute the same FP8 inputs. With FP8Linear's
        quantisation rounding as the interpreter does (so both sides cast alike), what is left is float32
        summation order in LayerNorm and RMSNorm, which moves an occasional float8 value by one step: the
        outputs agree to within a tenth of FP8's own error against the unquantised model (measured: 5e-5 and
        3.5e-3). One small batch: the interpreter runs each program in Python."""
        transformer = tiny_transformer(torch.float32)
        kwargs = model_inputs(2, batch=1, side=4, text=3)
        with torch.no_grad():
            exact = transformer(**kwargs)[0]
            accel.fuse_qkv(transformer)
            accel.quantize_fused_transformer(transformer, granularity="row", mode="w8a8", keep_original=False)
            monkeypatch.setattr(fp8, "quantize_tensor", lambda x, granularity="row": runtime.quantize_rows(
                x.float(), INTERPRETER))
            unfused = transformer(**kwargs)[0]
            blocks.install(transformer, blocks.BlockOptions("native", kernels=True, split=True))
            with FluxserveOps() as seen:
                fused = transformer(**kwargs)[0]
        assert seen.counts["norm_quant"] == 2 * 4 + 2  # 4 per double block, 1 per single block
        assert seen.counts["swiglu_quant"] == 2 * 4 + 2  # to_out, to_add_out, 2 x linear_out; to_out
        assert runtime.failure() is None
        fp8_error = rel(unfused, exact)
        assert 1e-3 <= fp8_error <= 5e-2
        assert rel(fused, unfused) <= min(1e-3, fp8_error / 10)
