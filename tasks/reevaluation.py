"""Evaluate a finished run's weights again, under other numerics presets: classification,
detection and segmentation runs alike.

An integer validation pass rounds stochastically, so its score is one draw: the same weights
score differently under another rounding seed. Scoring one checkpoint in fp32 and in an integer
preset under several rounding seeds separates what training learned (the fp32 score of the
weights) from what integer inference costs and from the rounding noise of a single pass.
"""
from __future__ import annotations

import csv
import dataclasses
import statistics
from pathlib import Path
from typing import Callable

import yaml
from omegaconf import OmegaConf

from intrain_core import Numerics, convert
from tasks.checkpoint import LAST, CheckpointError, load_checkpoint
from tasks.classification import build_model, evaluate, make_loader, resolve_device
from tasks.common.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Evaluation:
    run: str
    trained_with: str
    evaluated_with: str
    rounding_seed: int | None  # None: a float evaluation, which draws nothing
    metrics: dict[str, float]


def evaluate_run(run_dir: str | Path, presets: list[str], rounding_seeds: list[int],
                 device: str = "cpu") -> list[Evaluation]:
    """One evaluation per float preset and per (integer preset, rounding seed), on the run's own
    validation split (classification: also its batch size and ``limit_val_batches``)."""
    run_dir = Path(run_dir)
    numerics = {name: Numerics.preset(name) for name in presets}  # unknown names fail before any work
    config = _run_config(run_dir)
    family = config["task"].get("family", "classification")
    if family == "classification":
        score = _classification_scorer(run_dir, device)
    elif family in ("detection", "segmentation"):
        if device != "cpu":
            raise ConfigError(f"{run_dir} is a {family} run: mmengine places the model itself (--device cpu, "
                              "and CUDA_VISIBLE_DEVICES to choose)")
        from tasks.rescoring_openmmlab import score as score_openmmlab

        def score(preset: Numerics) -> dict[str, float]:
            return score_openmmlab(run_dir, family, preset)
    else:
        raise ConfigError(f"{run_dir} is a {family} run; re-evaluation covers {['classification', 'detection', 'segmentation']}")
    results = []
    for name, preset in numerics.items():
        for seed in rounding_seeds if preset.integer else [None]:
            metrics = score(preset if seed is None else dataclasses.replace(preset, seed=seed))
            results.append(Evaluation(str(run_dir), config["numerics"]["name"], name, seed, metrics))
    return results


def _run_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} has no config.yaml: not a run directory")
    return yaml.safe_load(path.read_text())


def _classification_scorer(run_dir: Path, device: str) -> Callable[[Numerics], dict[str, float]]:
    from tasks.datasets import build_datasets

    checkpoint = load_checkpoint(run_dir / LAST)
    config = checkpoint["config"]
    ds, tr = config["dataset"], config["trainer"]
    splits = build_datasets(ds["name"], root=ds["root"], image_size=int(ds["image_size"]), augment=bool(ds["augment"]))
    torch_device = resolve_device(device)
    loader = make_loader(splits.val, list(range(len(splits.val))), int(tr["eval_batch_size"]), 0, torch_device,
                         int(tr["seed"]), drop_last=False)

    def score(preset: Numerics) -> dict[str, float]:
        model = build_model(OmegaConf.create(config["task"]), splits.num_classes, splits.in_channels,
                            int(ds["image_size"]))
        model.load_state_dict(checkpoint["model"])
        model = convert(model.to(torch_device), preset)
        metrics = evaluate(model, loader, torch_device, splits.num_classes, tr.get("limit_val_batches"))
        return {k: metrics[k] for k in ("val/acc1", "val/loss")}

    return score


def summarise(evaluations: list[Evaluation]) -> list[dict[str, object]]:
    """Per (run, evaluation preset): mean, min and max of each metric over the rounding seeds."""
    groups: dict[tuple[str, str, str], list[Evaluation]] = {}
    for e in evaluations:
        groups.setdefault((e.run, e.trained_with, e.evaluated_with), []).append(e)
    rows = []
    for (run, trained_with, evaluated_with), group in groups.items():
        row: dict[str, object] = {"run": run, "trained_with": trained_with, "evaluated_with": evaluated_with,
                                  "passes": len(group)}
        for metric in group[0].metrics:
            values = [e.metrics[metric] for e in group]
            row[f"{metric}_mean"] = statistics.fmean(values)
            row[f"{metric}_min"], row[f"{metric}_max"] = min(values), max(values)
        rows.append(row)
    return rows


def write_summary(rows: list[dict[str, object]], prefix: Path, command: str) -> tuple[Path, Path]:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = prefix.with_suffix(".csv"), prefix.with_suffix(".md")
    columns = list(dict.fromkeys(c for row in rows for c in row))  # families differ in their metrics
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    def cell(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = [f"Command: `{command}`", "",
             "Each checkpoint scored again per evaluation preset; an integer preset once per rounding seed "
             "(mean, min and max over those passes).", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path
