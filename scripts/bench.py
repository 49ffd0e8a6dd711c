"""Training-step time and peak memory of integer against float training, measured in one run.

    python scripts/bench.py [--json] [--steps N] [--device cpu|cuda] [--models resnet18_cifar,...]

Each (model, numerics) pair runs in its own subprocess so that peak memory is its own: on CPU
the peak resident set size of the timed steps above the size before them (Linux), on CUDA
``torch.cuda.max_memory_allocated`` of the timed steps; the warm-up's compiler memory is left out. The step is a full training step: forward, cross-entropy,
backward and the optimiser (torch SGD for fp32 and bf16, IntSGD for int8). Reported time: the
median of ``--steps`` steps after two warm-up steps (the first compiles every fused kernel:
``INTRAIN_COMPILE=1``, the steady state of a long run).

Per model, one JSON object (``--json``: each as it is measured, then all of them on the last
line, keyed by model name):
- ``fp32_step_s``, ``int8_step_s``, ``ratio`` (int8 over fp32), ``peak_mem_ratio``;
- ``live_mem_ratio``: the same for the peak of live tensors in one step (on CPU the
  allocator's running total, without the freed memory that malloc keeps; on CUDA it is
  ``peak_mem_ratio``);
- ``bf16_step_s`` and ``bf16_ratio``: float32 under bfloat16 autocast, where the device has
  bfloat16 arithmetic (CUDA; CPUs with AVX-512 BF16 or AMX: elsewhere oneDNN emulates it, and
  one ResNet-18 step ran for minutes on an AVX2-only EPYC, 2026-12-02);
- ``optimizer_ratio``: one IntSGD step over one ``torch.optim.SGD(foreach=True)`` step on the
  same parameters and gradients;
- ``non_gemm_share``: the share of the int8 step's self time outside GEMM and convolution
  kernels (torch.profiler, one step);
- ``cpu``: the instruction-set level PyTorch reports; ``kernels``: the GEMM kernel the native
  backend chose, and the count of convolution shape classes that chose each kernel.

``--rounds R`` measures fp32 and int8 alternately R times (each in a fresh process) and reports
medians over the rounds, plus ``ratio_range``, the smallest and largest ratio of one round: on a
shared machine step times drift, and alternating lets a slow spell fall on both.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BATCH = 64
# Self time in these ops is the arithmetic itself (integer or float GEMMs and convolutions).
GEMM_OPS = {"aten::_int_mm", "aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::mkldnn_convolution",
            "aten::convolution_backward", "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward",
            "aten::cudnn_convolution", "aten::mkldnn_matmul"}


MODELS = ("resnet18_cifar", "vit_tiny_cifar", "vit_b16")


def build_model(name: str):
    import timm
    import torch
    import torchvision

    if name == "resnet18_cifar":
        model = torchvision.models.get_model("resnet18", weights=None, num_classes=10)
        model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = torch.nn.Identity()
        return model, 32
    if name == "vit_tiny_cifar":
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=4), 32
    if name == "vit_b16":
        return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=1000), 224
    raise ValueError(f"unknown benchmark model {name!r}; available: {', '.join(MODELS)}")


def _timed(fn, device: str) -> float:
    import torch

    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(model_name: str, numerics_name: str, steps: int, device: str) -> dict:
    """One (model, numerics) pair, in this process. ``bf16`` is fp32 under bfloat16 autocast."""
    import torch
    import torch.nn.functional as F

    from intrain_core import Numerics, convert
    from intrain_core.optim import build_optimizer

    torch.manual_seed(0)
    numerics = Numerics.preset("fp32" if numerics_name == "bf16" else numerics_name)
    model, size = build_model(model_name)
    model = convert(model.to(device), numerics)
    classes = 1000 if model_name == "vit_b16" else 10
    optimizer = build_optimizer(model.parameters(), numerics, lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(BATCH, 3, size, size, device=device)
    y = torch.randint(0, classes, (BATCH,), device=device)

    def forward_backward():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=numerics_name == "bf16"):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def step():
        forward_backward()
        optimizer.step()

    for _ in range(2):  # allocators, kernel choice, compilation
        _timed(step, device)
    # The steps' own peak: the compiler's memory during the warm-up is not the training's.
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = _reset_peak_rss()
    times = [_timed(step, device) for _ in range(steps)]
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss() - before
    live = peak if device == "cuda" else _live_peak_bytes(step)
    result = {"step_s": statistics.median(times), "peak_bytes": peak, "live_peak_bytes": live}
    if numerics_name == "int8":
        forward_backward()
        result["optimizer_s"] = statistics.median(_timed(optimizer.step, device) for _ in range(steps))
        reference = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, foreach=True)
        reference.step()
        result["sgd_s"] = statistics.median(_timed(reference.step, device) for _ in range(steps))
        result["non_gemm_share"] = _non_gemm_share(step)
        result["kernels"] = _kernels(device)
    return result


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> int:
    """Hand the allocator's free memory back to the system (glibc's malloc_trim), so that what
    a step allocates again counts in its peak; reset the process's peak resident set size
    (Linux: clear_refs 5); return the bytes resident now."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def _peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


def _live_peak_bytes(step) -> int:
    """The most bytes of tensors that one step holds at once beyond those alive before it: the
    CPU allocator's running total (torch.profiler's memory events), as CUDA's
    ``max_memory_allocated``. Memory that malloc keeps after a free is not in it."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    return max((e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"), default=0)


def _non_gemm_share(step) -> float:
    from torch.profiler import profile

    with profile() as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS)
    return 1.0 - gemm / total if total else 0.0


def _kernels(device: str) -> dict:
    """The GEMM kernel, and how many convolution shape classes (forward, input and weight
    gradients) chose each kernel."""
    from collections import Counter

    from intrain_core.backends.native import conv_choices, gemm_kernel

    return {"gemm": gemm_kernel(device), "conv": dict(Counter(conv_choices.values()))}


def run_isolated(model_name: str, numerics_name: str, steps: int, device: str) -> dict | None:
    out = subprocess.run(
        [sys.executable, __file__, "--one", model_name, numerics_name, "--steps", str(steps), "--device", device],
        # Every fused kernel compiled at its first call: the steady state of a long run.
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "INTRAIN_COMPILE": "1"},
    )
    if out.returncode != 0:
        if numerics_name == "bf16":  # not every device runs bfloat16 autocast
            return None
        raise SystemExit(f"bench: {model_name} {numerics_name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median_of(runs: list[dict]) -> dict:
    """Each number the median over rounds; the int8-only entries from the median round."""
    middle = sorted(runs, key=lambda r: r["step_s"])[len(runs) // 2]
    return {**middle, "step_s": statistics.median(r["step_s"] for r in runs),
            **{key: statistics.median(r[key] for r in runs) for key in ("peak_bytes", "live_peak_bytes")}}


def summary(model_name: str, steps: int, device: str, rounds: int = 1) -> dict:
    import torch

    fp32_runs, int8_runs = [], []
    for _ in range(rounds):
        fp32_runs.append(run_isolated(model_name, "fp32", steps, device))
        int8_runs.append(run_isolated(model_name, "int8", steps, device))
    fp32, int8 = _median_of(fp32_runs), _median_of(int8_runs)
    bf16 = run_isolated(model_name, "bf16", steps, device) if has_bf16_arithmetic(device) else None
    result = {
        "model": model_name,
        "fp32_step_s": round(fp32["step_s"], 4),
        "int8_step_s": round(int8["step_s"], 4),
        "ratio": round(int8["step_s"] / fp32["step_s"], 3),
        "peak_mem_ratio": round(int8["peak_bytes"] / max(fp32["peak_bytes"], 1), 3),
        "live_mem_ratio": round(int8["live_peak_bytes"] / max(fp32["live_peak_bytes"], 1), 3),
        "optimizer_ratio": round(int8["optimizer_s"] / int8["sgd_s"], 3),
        "non_gemm_share": round(int8["non_gemm_share"], 3),
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "machine": cpu_name(),
        "kernels": int8["kernels"],
    }
    if rounds > 1:
        round_ratios = [i["step_s"] / f["step_s"] for f, i in zip(fp32_runs, int8_runs)]
        result["rounds"] = rounds
        result["ratio_range"] = [round(min(round_ratios), 3), round(max(round_ratios), 3)]
    if bf16 is not None:
        result["bf16_step_s"] = round(bf16["step_s"], 4)
        result["bf16_ratio"] = round(bf16["step_s"] / fp32["step_s"], 3)
    return result


def has_bf16_arithmetic(device: str) -> bool:
    import torch

    return device == "cuda" or torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="one JSON object per model per line")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1,
                        help="fp32 and int8 measured alternately this many times; medians over rounds")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", default=None, help="default: resnet18_cifar,vit_tiny_cifar (and vit_b16 on cuda)")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "NUMERICS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.steps, args.device)))
        return
    if args.steps < 1 or args.rounds < 1:
        raise SystemExit(f"bench: --steps and --rounds must be at least 1 (got {args.steps} and {args.rounds})")
    models = args.models or ("resnet18_cifar,vit_tiny_cifar" + (",vit_b16" if args.device == "cuda" else ""))
    unknown = [name for name in models.split(",") if name not in MODELS]
    if unknown:
        raise SystemExit(f"bench: unknown model {unknown[0]!r} in --models; available: {', '.join(MODELS)}")
    results = []
    for name in models.split(","):
        results.append(summary(name, args.steps, args.device, args.rounds))
        if args.json:
            print(json.dumps(results[-1]), flush=True)
    if args.json:
        print(json.dumps({r["model"]: r for r in results}))
        return
    print(f"{cpu_name()} ({results[0]['cpu']}), batch {BATCH}, device {args.device}")
    print(f"{'model':<16}{'fp32 s':>9}{'int8 s':>9}{'ratio':>7}{'bf16':>7}{'mem':>7}{'live':>7}{'opt':>7}{'non-GEMM':>10}  kernels")
    for r in results:
        print(f"{r['model']:<16}{r['fp32_step_s']:>9.3f}{r['int8_step_s']:>9.3f}{r['ratio']:>7.2f}"
              f"{r.get('bf16_ratio', float('nan')):>7.2f}{r['peak_mem_ratio']:>7.2f}{r['live_mem_ratio']:>7.2f}"
              f"{r['optimizer_ratio']:>7.2f}{r['non_gemm_share']:>10.2f}  {r['kernels']}")


if __name__ == "__main__":
    main()
