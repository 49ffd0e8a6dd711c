"""Summarise trace_steps.py folders: the batch-norm layers whose backward gain bursts, and the
steps around the loss spike (loss, the image-pool norm's gain, the backbone's gradient norm).

    python results/segmentation/deeplabv3_600_cause/summarise_trace.py FIRST LAST TRACE_DIR...
"""
import collections
import csv
import math
import sys
from pathlib import Path


def read(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


first, last = int(sys.argv[1]), int(sys.argv[2])
for trace in map(Path, sys.argv[3:]):
    gains = collections.defaultdict(dict)
    for r in read(trace / "bn.csv"):
        gains[r["layer"]][int(r["step"])] = (float(r["backward_gain"]), float(r["channels_below_one_step"]))
    backbone = collections.defaultdict(float)
    for r in read(trace / "params.csv"):
        if r["param"].startswith("backbone."):
            backbone[int(r["step"])] += float(r["grad_norm"]) ** 2
    loss = {int(r["step"]): float(r["train/loss"]) for r in read(trace / "metrics.csv") if r["train/loss"]}
    print(f"== {trace.name}: {len(loss)} steps")
    for layer, by_step in gains.items():
        median = sorted(g for g, _ in by_step.values())[len(by_step) // 2]
        bursts = [f"{s} ({g:.0f})" for s, (g, _) in sorted(by_step.items()) if g > 50 * median]
        collapsed = sum(1 for _, b in by_step.values() if b > 0)
        if bursts or collapsed:
            print(f"{layer}: median gain {median:.3g}, max {max(g for g, _ in by_step.values()):.3g}; "
                  f"steps with a channel within one 8-bit step: {collapsed}; gain > 50x median at: {', '.join(bursts) or '-'}")
    pool = gains["decode_head.image_pool.1.bn"]
    print("step  loss    image-pool gain  channels within one step  backbone grad norm")
    for s in range(first, last + 1):
        print(f"{s:4d}  {loss[s]:.3f}  {pool[s][0]:15.4g}  {pool[s][1]:24.4f}  {math.sqrt(backbone[s]):18.4g}")
