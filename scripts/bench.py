"""Training-step time and peak memory, int8 over fp32, measured in one run on this machine.

    python scripts/bench.py [--json] [--steps N] [--device cpu|cuda] [--models resnet18_cifar,...]

Each (model, numerics) pair runs in its own subprocess so that peak memory is its own: on CPU
the peak resident set size above the process's size before the first step; on CUDA
``torch.cuda.max_memory_allocated``. The step is a full training step: forward, cross-entropy,
backward and the optimiser (torch SGD for fp32, IntSGD for int8). Reported time: the median of
``--steps`` steps after one warm-up step.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BATCH = 64


def build_model(name: str):
    import timm
    import torch
    import torchvision

    if name == "resnet18_cifar":
        model = torchvision.models.get_model("resnet18", weights=None, num_classes=10)
        model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = torch.nn.Identity()
        return model
    if name == "vit_tiny_cifar":
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=4)
    raise ValueError(f"unknown benchmark model {name!r}; available: resnet18_cifar, vit_tiny_cifar")


def measure(model_name: str, numerics_name: str, steps: int, device: str) -> dict:
    """One (model, numerics) pair, in this process."""
    import torch
    import torch.nn.functional as F

    from intrain_core import Numerics, convert
    from intrain_core.optim import build_optimizer

    torch.manual_seed(0)
    numerics = Numerics.preset(numerics_name)
    model = convert(build_model(model_name).to(device), numerics)
    optimizer = build_optimizer(model.parameters(), numerics, lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(BATCH, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (BATCH,), device=device)

    def step():
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        step()
        if i:  # the first step warms up allocators and kernel selection
            times.append(time.perf_counter() - start)
    if device == "cuda":
        peak_bytes = torch.cuda.max_memory_allocated()
    else:
        peak_bytes = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kib) * 1024
    return {"step_s": statistics.median(times), "peak_bytes": peak_bytes}


def run_isolated(model_name: str, numerics_name: str, steps: int, device: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--one", model_name, numerics_name, "--steps", str(steps), "--device", device],
        check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def kernel_note(device: str) -> str:
    import torch

    from intrain_core.backends.native import gemm_kernel

    a = torch.randint(-127, 128, (1024, 1024), dtype=torch.int8, device=device)
    b = torch.randint(-127, 128, (1024, 1024), dtype=torch.int8, device=device)
    af, bf = a.float(), b.float()

    def best(fn):
        fn()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return min(times)

    int_s, float_s = best(lambda: torch._int_mm(a, b)), best(lambda: af @ bf)
    return (
        f"1024^3 GEMM: torch._int_mm {int_s * 1e3:.2f} ms, float32 {float_s * 1e3:.2f} ms "
        f"(int8/fp32 time ratio {int_s / float_s:.2f}); native kernel chosen: {gemm_kernel(device)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", default="resnet18_cifar,vit_tiny_cifar")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "NUMERICS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.steps, args.device)))
        return
    results = {}
    for model_name in args.models.split(","):
        fp32 = run_isolated(model_name, "fp32", args.steps, args.device)
        int8 = run_isolated(model_name, "int8", args.steps, args.device)
        results[model_name] = {
            "fp32_step_s": round(fp32["step_s"], 4),
            "int8_step_s": round(int8["step_s"], 4),
            "ratio": round(int8["step_s"] / fp32["step_s"], 3),
            "peak_mem_ratio": round(int8["peak_bytes"] / max(fp32["peak_bytes"], 1), 3),
        }
    if args.json:
        print(json.dumps(results))
        return
    print(kernel_note(args.device))
    print(f"{'model':<18}{'fp32 step s':>12}{'int8 step s':>12}{'time ratio':>12}{'peak mem ratio':>16}")
    for name, r in results.items():
        print(f"{name:<18}{r['fp32_step_s']:>12.3f}{r['int8_step_s']:>12.3f}{r['ratio']:>12.2f}{r['peak_mem_ratio']:>16.2f}")


if __name__ == "__main__":
    main()
