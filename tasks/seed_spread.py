"""A change set against the seed spread: runs that differ only in their seed give the noise (the
trajectory gap between every two of them), and each paired run (the same seed, one thing changed,
e.g. 2 processes instead of 1) is compared with its own seed's run: the i-th paired run with the
i-th seed run. A change whose gaps stay
within the seed-to-seed gaps cannot be told apart from another seed."""
from __future__ import annotations

from itertools import combinations

import numpy as np

from tasks.curves import DEFAULT_SMOOTH, Run, json_number, trajectory_gap


def summarize(seed_runs: list[Run], paired_runs: list[Run], smooth: int = DEFAULT_SMOOTH) -> dict:
    """Seed-to-seed gaps, paired gaps and final validation metrics, as plain JSON values."""
    if len(seed_runs) < 2:
        raise ValueError(f"a seed spread needs at least 2 runs of different seeds, got {len(seed_runs)}")
    if not 1 <= len(paired_runs) <= len(seed_runs):
        raise ValueError(f"{len(paired_runs)} paired runs for {len(seed_runs)} seed runs: pair 1 to "
                         f"{len(seed_runs)} runs, the i-th with the i-th seed run")
    seed_pairs = [(a, b, trajectory_gap(a, b, smooth)) for a, b in combinations(seed_runs, 2)]
    paired = [(a, b, trajectory_gap(a, b, smooth)) for a, b in zip(seed_runs, paired_runs)]
    seed_gaps, paired_gaps = [g for *_, g in seed_pairs], [g for *_, g in paired]
    metrics = list(dict.fromkeys(m for r in seed_runs + paired_runs for m in r.val_metrics))
    return {
        "smooth": smooth,
        "seed_gap": _stats(seed_gaps),
        "paired_gap": _stats(paired_gaps),
        "within_seed_spread": bool(max(paired_gaps) <= max(seed_gaps)),
        "paired_below_seed_mean": int(sum(g <= np.mean(seed_gaps) for g in paired_gaps)),
        "seed_pairs": [{"reference": a.name, "run": b.name, "gap": json_number(g)} for a, b, g in seed_pairs],
        "pairs": [{"reference": a.name, "run": b.name, "gap": json_number(g),
                   "final": {m: [json_number(a.final(m)), json_number(b.final(m))] for m in metrics}}
                  for a, b, g in paired],
        "final_seed_range": {m: json_number(np.ptp([r.final(m) for r in seed_runs])) for m in metrics},
        "final_paired_delta": {m: _stats([abs(b.final(m) - a.final(m)) for a, b, _ in paired]) for m in metrics},
    }


def _stats(values: list[float]) -> dict:
    return {"mean": json_number(np.mean(values)), "min": json_number(np.min(values)),
            "max": json_number(np.max(values)), "n": len(values)}


def to_markdown(summary: dict) -> str:
    seed, paired = summary["seed_gap"], summary["paired_gap"]
    verdict = "within" if summary["within_seed_spread"] else "NOT within"
    lines = [
        f"Trajectory gap (mean over common steps of |L - L_ref| / L_ref, training losses smoothed over "
        f"{summary['smooth']} logged steps). Seed spread: every two seed runs; paired: each run against the seed "
        "run of its position.",
        "",
        "| comparison | n | mean | min | max |",
        "|---|---|---|---|---|",
        f"| seed to seed | {seed['n']} | {seed['mean']:.4f} | {seed['min']:.4f} | {seed['max']:.4f} |",
        f"| paired | {paired['n']} | {paired['mean']:.4f} | {paired['min']:.4f} | {paired['max']:.4f} |",
        "",
        f"The paired gaps are **{verdict}** the seed spread (largest paired gap against the largest seed-to-seed "
        f"gap); {summary['paired_below_seed_mean']} of {paired['n']} are at most the mean seed-to-seed gap.",
        "",
        "| reference | paired run | gap | " + " | ".join(f"{m} (ref, paired)" for m in summary["final_seed_range"]) + " |",
        "|---|---|---|" + "---|" * len(summary["final_seed_range"]),
    ]
    for pair in summary["pairs"]:
        finals = [f"{_fmt(a)}, {_fmt(b)}" for a, b in pair["final"].values()]
        lines.append(f"| {pair['reference']} | {pair['run']} | {pair['gap']:.4f} | " + " | ".join(finals) + " |")
    lines.append("")
    for metric, spread in summary["final_seed_range"].items():
        delta = summary["final_paired_delta"][metric]
        lines.append(f"- {metric}: range over the seed runs {_fmt(spread)}; |paired - reference| mean "
                     f"{_fmt(delta['mean'])}, max {_fmt(delta['max'])}")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"
