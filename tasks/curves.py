"""Comparing training runs from their run directories (metrics.csv, config.yaml): the final
validation metrics, their deltas against the fp32 run, the training-loss trajectory gap, and
an overlay plot. ``scripts/compare_curves.py`` is the command line on top."""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from matplotlib.figure import Figure

REFERENCE_NUMERICS = "fp32"
TRAIN_LOSS = "train/loss"
VAL_PREFIX = "val/"
DEFAULT_SMOOTH = 10


@dataclass(frozen=True, eq=False)
class Run:
    name: str  # the run directory's name
    numerics: str  # config.yaml's numerics.name, else the directory's name
    path: Path
    metrics: dict[str, np.ndarray]  # column -> float64 values per logged row, NaN where empty

    @property
    def val_metrics(self) -> list[str]:
        """The validation columns logged at least once (the CSV header may list more)."""
        return [c for c, v in self.metrics.items() if c.startswith(VAL_PREFIX) and np.isfinite(v).any()]

    @property
    def x_name(self) -> str:
        """The column that orders the rows: ``step``, else ``epoch``, else the row number."""
        return next((c for c in ("step", "epoch") if c in self.metrics), "row")

    def steps(self) -> np.ndarray:
        if self.x_name in self.metrics:
            return self.metrics[self.x_name]
        return np.arange(self.num_rows, dtype=np.float64)

    @property
    def num_rows(self) -> int:
        return len(next(iter(self.metrics.values()))) if self.metrics else 0

    def series(self, column: str) -> tuple[np.ndarray, np.ndarray]:
        """(step, value) of the rows where ``column`` was logged."""
        if column not in self.metrics:
            return np.empty(0), np.empty(0)
        values = self.metrics[column]
        logged = np.isfinite(values)
        return self.steps()[logged], values[logged]

    def final(self, column: str) -> float:
        """The last logged value of ``column``; NaN if never logged."""
        _, values = self.series(column)
        return float(values[-1]) if len(values) else math.nan


def load_run(run_dir: str | Path) -> Run:
    path = Path(run_dir)
    metrics_file = path / "metrics.csv"
    if not metrics_file.is_file():
        raise FileNotFoundError(
            f"{metrics_file} not found: expected a run directory written by train.py (metrics.csv, config.yaml)"
        )
    with open(metrics_file, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{metrics_file} is empty: expected a header row (step, epoch, train/loss, ...)")
        rows = [row + [""] * (len(header) - len(row)) for row in reader if row]
    metrics = {
        column: np.array([_number(row[i]) for row in rows], dtype=np.float64) for i, column in enumerate(header)
    }
    name = path.resolve().name
    return Run(name=name, numerics=_numerics_name(path) or name, path=path, metrics=metrics)


def _number(cell: str) -> float:
    try:
        return float(cell)
    except ValueError:  # empty cell: not logged on this row
        return math.nan


def _numerics_name(path: Path) -> str | None:
    config_file = path / "config.yaml"
    if not config_file.is_file():
        return None
    try:
        config = yaml.safe_load(config_file.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{config_file}: not valid YAML ({err})") from None
    numerics = config.get("numerics") if isinstance(config, dict) else None
    name = numerics.get("name") if isinstance(numerics, dict) else None
    return str(name) if name is not None else None


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points; the first points average what there is.
    Trailing, not centred: the value at a step depends only on what was logged by then."""
    if window < 1:
        raise ValueError(f"smoothing window must be >= 1, got {window}")
    sums = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def smoothed_train_loss(run: Run, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(step, smoothed train loss), one point per step (the last logged, should a step repeat)."""
    steps, losses = run.series(TRAIN_LOSS)
    losses = moving_average(losses, window)
    order = np.argsort(steps, kind="stable")
    steps, losses = steps[order], losses[order]
    last_of_step = np.append(steps[1:] != steps[:-1], True)
    return steps[last_of_step], losses[last_of_step]


def trajectory_gap(fp_run: Run, int_run: Run, smooth: int = DEFAULT_SMOOTH) -> float:
    """Mean over the steps both runs logged of |L_int - L_fp| / L_fp, on training losses
    smoothed over ``smooth`` logged steps. NaN when the runs share no step."""
    fp_steps, fp_loss = smoothed_train_loss(fp_run, smooth)
    int_steps, int_loss = smoothed_train_loss(int_run, smooth)
    _, fp_at, int_at = np.intersect1d(fp_steps, int_steps, assume_unique=True, return_indices=True)
    fp_loss, int_loss = fp_loss[fp_at], int_loss[int_at]
    positive = fp_loss > 0  # a relative gap needs a positive reference
    if not positive.any():
        return math.nan
    return float(np.mean(np.abs(int_loss[positive] - fp_loss[positive]) / fp_loss[positive]))


def labels(runs: list[Run]) -> list[str]:
    """Each run's numerics name; the directory name is added where two runs share one."""
    names = [r.numerics for r in runs]
    return [f"{r.numerics} ({r.name})" if names.count(r.numerics) > 1 else r.numerics for r in runs]


def reference_index(runs: list[Run]) -> int:
    """The fp32 run if there is one, else the first."""
    return next((i for i, r in enumerate(runs) if r.numerics == REFERENCE_NUMERICS), 0)


def summarize(runs: list[Run], smooth: int = DEFAULT_SMOOTH) -> dict:
    """Final validation metrics, deltas and trajectory gaps against the reference run, as
    plain JSON values (None where a value is missing)."""
    if not runs:
        raise ValueError("summarize needs at least one run")
    ref = runs[reference_index(runs)]
    metrics = list(dict.fromkeys(m for r in runs for m in r.val_metrics))
    entries = []
    for run, label in zip(runs, labels(runs)):
        final = {m: run.final(m) for m in metrics}
        _, train_loss = run.series(TRAIN_LOSS)
        entries.append(
            {
                "label": label,
                "numerics": run.numerics,
                "dir": str(run.path),
                "reference": run is ref,
                "final": {m: json_number(v) for m, v in final.items()},
                "delta": {m: json_number(v - ref.final(m)) for m, v in final.items()},
                "trajectory_gap": None if run is ref else json_number(trajectory_gap(ref, run, smooth)),
                "final_train_loss": json_number(train_loss[-smooth:].mean() if len(train_loss) else math.nan),
                "last_step": json_number(run.steps()[-1] if run.num_rows else math.nan),
            }
        )
    return {"reference": labels(runs)[runs.index(ref)], "smooth": smooth, "metrics": metrics, "runs": entries}


def json_number(value: float) -> float | None:
    """``value`` as JSON can hold it: NaN and infinities become None."""
    value = float(value)
    return value if math.isfinite(value) else None


def to_markdown(summary: dict) -> str:
    metrics = summary["metrics"]
    header = ["run", *[f"{m} (Δ)" for m in metrics], "final train loss", "trajectory gap"]
    lines = [
        f"Reference: **{summary['reference']}**. Δ = final value minus the reference's. Trajectory gap: "
        f"mean over common steps of |L - L_ref| / L_ref, training losses smoothed over {summary['smooth']} "
        f"logged steps; final train loss: the mean of the last {summary['smooth']} logged.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for entry in summary["runs"]:
        cells = [entry["label"]]
        for m in metrics:
            value, delta = entry["final"][m], entry["delta"][m]
            cells.append("—" if value is None else f"{value:.4g} ({'—' if delta is None else f'{delta:+.4g}'})")
        cells.append(_fmt(entry["final_train_loss"], ".4g"))
        cells.append("reference" if entry["reference"] else _fmt(entry["trajectory_gap"], ".4f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def write_summary(summary: dict, prefix: str | Path, render=to_markdown) -> tuple[Path, Path]:
    """``<prefix>.md`` (``render(summary)``) and ``<prefix>.json``."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    md_path, json_path = prefix.with_name(prefix.name + ".md"), prefix.with_name(prefix.name + ".json")
    md_path.write_text(render(summary))
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    return md_path, json_path


def plot(runs: list[Run], path: str | Path, smooth: int = DEFAULT_SMOOTH) -> Path:
    """One panel for the training loss (raw, faint; smoothed, solid) and one per validation
    metric, every run overlaid. Drawn on a bare Figure (Agg), leaving pyplot's state alone."""
    if not runs:
        raise ValueError("plot needs at least one run")
    path = Path(path)
    metrics = list(dict.fromkeys(m for r in runs for m in r.val_metrics))
    panels = [TRAIN_LOSS, *metrics]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5 * ncols, 3.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for index, (run, label) in enumerate(zip(runs, labels(runs))):
        colour = f"C{index % 10}"
        steps, losses = run.series(TRAIN_LOSS)
        axes[0].plot(steps, losses, color=colour, alpha=0.25, linewidth=0.8)
        axes[0].plot(steps, moving_average(losses, smooth), color=colour, label=label)
        for ax, metric in zip(axes[1:], metrics):
            x, y = run.series(metric)
            ax.plot(x, y, color=colour, marker="o", markersize=3, label=label)
    for ax, panel in zip(axes, panels):
        ax.set_title(panel if panel != TRAIN_LOSS else f"{TRAIN_LOSS} (smoothed over {smooth})")
        ax.set_xlabel(runs[0].x_name)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    axes[0].legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
