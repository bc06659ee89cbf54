#!/usr/bin/env bash
# The CUDA checks in one run: the env at 1,024 envs, vit_small and vit_base at batch 256 in fp32 and under bf16
# autocast, a one-process nccl group under torchrun, and joint training under torchrun on the GPU. Each benchmark
# prints its ratios, measured side by side in its own run; everything is also written under OUT.
# Run: bash benchmarks/gpu_checks.sh [OUT]   (needs a CUDA device)
set -euo pipefail
out=${1:-runs/gpu_checks}
mkdir -p "$out"
python -c 'import sys, torch; torch.cuda.is_available() or sys.exit("no CUDA device: these checks need one"); print(torch.cuda.get_device_name(0), "torch", torch.__version__)'
python benchmarks/bench_env.py --device cuda --num-envs 1024 --sync-episodes 0 | tee "$out/env.txt"
for amp in none bf16; do
  python benchmarks/bench_backbone.py --device cuda --models vit_small_patch16_224 vit_base_patch16_224 \
    --batch-sizes 256 --amp "$amp" | tee "$out/backbone_$amp.txt"
done
# One process joins an nccl group (train_backbone.py joins one only for two processes or more) and all-reduces.
cat > "$out/nccl_check.py" <<'PY'
import torch
import torch.distributed as dist

from apt_env.train.distributed import backend_for

dist.init_process_group(backend_for(use_cuda=True))
x = torch.ones(1, device="cuda")
dist.all_reduce(x)
print(f"rank {dist.get_rank()} of {dist.get_world_size()}: backend {dist.get_backend()}, all_reduce {x.item():g}")
dist.destroy_process_group()
PY
PYTHONPATH=. torchrun --standalone --nproc_per_node 1 "$out/nccl_check.py" | tee "$out/nccl.txt"
torchrun --standalone --nproc_per_node 1 train_backbone.py --device cuda --epochs 1 --steps-per-epoch 5 \
  --agent-steps 1024 --no-compare-plain --exp-name torchrun --out-dir "$out/torchrun" 2>&1 | tail -n 5
