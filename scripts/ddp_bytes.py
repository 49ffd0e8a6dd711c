"""Bytes each process hands to the gradient all-reduce per step: integer hook against float32 DDP.

    python scripts/ddp_bytes.py [--model resnet18] [--processes 2] [--bucket-mb 25]

Runs one int8 training step (batch 2 per process, 32x32 inputs, 10 classes) of a torchvision
model under DistributedDataParallel on gloo CPU processes with the integer all-reduce, and prints
one JSON line: the payload measured by the hook (``integer``: int32 mantissas plus one int64
exponent per gradient tensor and a flag per bucket; ``float32``: what float DDP sends for the same
buckets), their ratio, and the bytes a ring all-reduce puts on each process's link,
2 (N - 1) / N times the payload. The exponents' MAX all-reduce is included in ``integer``.
"""
from __future__ import annotations

import argparse
import json
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision

import intrain_core as ic
from intrain_core.distributed import register_integer_allreduce


def _step(rank: int, args, folder: str, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=args.processes)
    torch.manual_seed(0)
    model = ic.convert(torchvision.models.get_model(args.model, num_classes=10), "int8")
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=args.bucket_mb)
    state = register_integer_allreduce(ddp)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    torch.nn.functional.cross_entropy(ddp(x), y).backward()
    if rank == 0:
        sent = state.bytes_per_step()
        ring = 2 * (args.processes - 1) / args.processes
        queue.put({"model": args.model, "processes": args.processes, "buckets": len(state.sent),
                   "parameters": sum(p.numel() for p in model.parameters()), **sent,
                   "ring_integer": ring * sent["integer"], "ring_float32": ring * sent["float32"]})
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--bucket-mb", type=float, default=25.0)
    args = parser.parse_args()
    if args.processes < 2:
        parser.error("--processes must be at least 2")
    queue = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_step, args=(args, folder, queue), nprocs=args.processes, join=True)
    print(json.dumps(queue.get()))


if __name__ == "__main__":
    main()
