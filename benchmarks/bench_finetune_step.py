"""Benchmark: one full fine-tuning step of the default backbone, fp32 vs bf16 autocast on the CPU.

python benchmarks/bench_finetune_step.py [--batch 32] [--steps 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from pneumoscope.models.classifier import create_model
from pneumoscope.runtime import tune_cpu_allocator


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    tune_cpu_allocator()
    model = create_model(pretrained="none").train()
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    s = model.preprocessing.input_size
    x, y = torch.randn(args.batch, 3, s, s), torch.rand(args.batch)
    for mode in ("fp32", "bf16"):
        times = []
        for i in range(args.steps + 1):  # the first step warms up
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
                loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0].float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i:
                times.append(time.perf_counter() - t0)
        print(f"{mode}: {args.batch / (sum(times) / len(times)):.1f} training images/s")


if __name__ == "__main__":
    main()
