#!/usr/bin/env bash
# Reproduce every GPU row of docs/performance.md. Run from the repository root on a CUDA machine with
# fluxserve installed (see benchmarks/README.md for a machine without diffusers). Writes one JSON per row to
# $OUT_DIR (default benchmarks/results/<gpu>), then prints a table of them.
#
#   benchmarks/gpu_matrix.sh            # every row that fits this GPU
#   ROWS="klein-4b" benchmarks/gpu_matrix.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
GPU="$($PY -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "_"))')"
# GiB of the GPU: stock diffusers holds dev in bf16 (~112 GB), so the dev baseline only runs on a 141 GB GPU.
GPU_GIB="$($PY -c 'import torch; print(int(torch.cuda.get_device_properties(0).total_memory / 2**30))')"
OUT_DIR="${OUT_DIR:-benchmarks/results/$GPU}"
ROWS="${ROWS:-klein-4b klein-9b dev}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

bench() {  # name, then fluxserve bench flags
  local name="$1"; shift
  echo "== $name: fluxserve bench $*"
  $PY -m fluxserve bench --random-weights --json "$OUT_DIR/$name.json" "$@" || echo "!! $name failed"
}

for row in $ROWS; do
  case "$row" in
    klein-4b)
      bench klein-4b-1024-none     --model klein-4b --size 1024x1024 --steps 4 --acceleration none --baseline diffusers --repeat 5 --warmup 2
      bench klein-4b-1024-regular  --model klein-4b --size 1024x1024 --steps 4 --acceleration regular --repeat 5 --warmup 2
      bench klein-4b-1024-high     --model klein-4b --size 1024x1024 --steps 4 --acceleration high --repeat 5 --warmup 2
      bench klein-4b-1024-ref1     --model klein-4b --size 1024x1024 --steps 4 --refs 1 --acceleration regular --repeat 5 --warmup 2
      ;;
    klein-9b)
      bench klein-9b-1024-regular  --model klein-9b --size 1024x1024 --steps 4 --acceleration regular --baseline diffusers --repeat 5 --warmup 2
      bench klein-9b-1024-high     --model klein-9b --size 1024x1024 --steps 4 --acceleration high --repeat 5 --warmup 2
      ;;
    dev)
      # --random-weights builds to fit, like real weights (fluxserve plan --gpu-memory ... shows the plan): on an
      # 80 GB GPU the default holds the transformer and Mistral in FP8 (FP8 matmuls at every level), and
      # --transformer bf16 keeps the transformer lossless with a streamed text encoder; on a 141 GB H200 everything
      # stays bf16, and high needs --transformer fp8 (the FP8 copy does not fit beside bf16 there).
      if [ "$GPU_GIB" -ge 120 ]; then
        bench dev-1024-regular     --model dev --size 1024x1024 --steps 28 --acceleration regular --baseline diffusers --repeat 3 --warmup 1
        bench dev-1024-high-fp8    --model dev --size 1024x1024 --steps 28 --acceleration high --transformer fp8 --repeat 3 --warmup 1
      else
        bench dev-1024-fp8         --model dev --size 1024x1024 --steps 28 --acceleration regular --repeat 3 --warmup 1
        bench dev-1024-bf16-stream --model dev --size 1024x1024 --steps 28 --acceleration regular --transformer bf16 --repeat 3 --warmup 1
      fi
      bench dev-1024-ref1          --model dev --size 1024x1024 --steps 28 --refs 1 --acceleration regular --repeat 3 --warmup 1
      bench dev-2048-regular       --model dev --size 2048x2048 --steps 28 --acceleration regular --repeat 2 --warmup 1
      ;;
    *) echo "unknown row group $row (klein-4b, klein-9b, dev)"; exit 2 ;;
  esac
done

$PY - "$OUT_DIR" <<'PYEOF'
import json, pathlib, sys
print("| device | model | resolution | steps | weights (transformer / text encoder) | precision | ms/step "
      "| end to end (s) | peak GiB | load peak GiB | resident GiB | MFU | x diffusers |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(path.read_text()); q = r["request"]; o = r["fluxserve"]
    mfu = r["mfu"]["value"]; sp = (r.get("speedup") or {}).get("end_to_end")
    placed = r["placement"]["models"].get(r["model"], {})
    held = placed.get("summary", f"{placed.get('transformer')} / {placed.get('text_encoder')}")
    print(f"| {r['device']['name']} | {r['model']} ({q['acceleration']}, {q['refs']} refs) | {q['width']}x{q['height']} "
          f"| {q['steps']} | {held} | {r['precision']} | {o['step_ms']:.1f} | {o['end_to_end_s']:.2f} | {o['peak_memory_gib']} "
          f"| {o.get('load_peak_memory_gib')} | {o.get('resident_memory_gib')} "
          f"| {'' if mfu is None else f'{mfu*100:.0f}%'} | {'' if sp is None else f'{sp:.2f}'} |")
PYEOF
