"""Summarise trace_steps.py folders: the batch-norm layers whose backward gain bursts, and the
steps around a loss spike (loss, one norm layer's gain, the backbone's gradient norm).

    python scripts/diagnostics/summarise_trace.py FIRST LAST TRACE_DIR... [--layer NAME]
"""
import argparse
import collections
import csv
import math
from pathlib import Path


def read(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def summarise(trace: Path, first: int, last: int, layer_name: str) -> None:
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
    pool = gains[layer_name]
    print(f"step  loss    {layer_name} gain  channels within one step  backbone grad norm")
    for s in range(first, last + 1):
        print(f"{s:4d}  {loss[s]:.3f}  {pool[s][0]:15.4g}  {pool[s][1]:24.4f}  {math.sqrt(backbone[s]):18.4g}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=int)
    parser.add_argument("last", type=int)
    parser.add_argument("traces", nargs="+", type=Path, metavar="TRACE_DIR")
    parser.add_argument("--layer", default="decode_head.image_pool.1.bn", help="the norm layer shown per step")
    args = parser.parse_args(argv)
    for trace in args.traces:
        summarise(trace, args.first, args.last, args.layer)


if __name__ == "__main__":
    main()
