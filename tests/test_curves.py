"""tasks.curves and scripts/compare_curves.py on synthetic run directories with known curves."""
import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks import curves, seed_spread

ROOT = Path(__file__).resolve().parent.parent
STEPS = 50
VAL_EVERY = 10
COLUMNS = ["step", "epoch", "train/loss", "lr", "val/loss", "val/acc1", "val/acc5"]  # acc5 never logged


def fp_loss(step):
    return 2.0 * math.exp(-step / 20) + 0.1 + 0.05 * math.sin(step)  # noisy, so smoothing matters


def write_run(run_dir, numerics, loss_scale=1.0, acc1=0.9, config=True):
    """A run directory like train.py's: training rows every step, validation rows (empty
    train cells) every VAL_EVERY steps, with val/acc1 rising linearly to ``acc1``."""
    run_dir.mkdir(parents=True)
    rows = []
    for step in range(1, STEPS + 1):
        rows.append({"step": step, "epoch": step // VAL_EVERY, "train/loss": loss_scale * fp_loss(step), "lr": 0.1})
        if step % VAL_EVERY == 0:
            val_acc = acc1 * step / STEPS
            rows.append({"step": step, "epoch": step // VAL_EVERY, "val/loss": 1 - val_acc, "val/acc1": val_acc})
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    if config:
        (run_dir / "config.yaml").write_text(f"numerics:\n  name: {numerics}\n  integer: true\ntrainer:\n  seed: 0\n")
    return run_dir


@pytest.fixture
def run_dirs(tmp_path):
    # int8 listed first: the reference must still be the fp32 run.
    int_dir = write_run(tmp_path / "exp" / "int8", "int8", loss_scale=1.1, acc1=0.85)
    fp_dir = write_run(tmp_path / "exp" / "fp32", "fp32", loss_scale=1.0, acc1=0.9)
    return int_dir, fp_dir


def test_load_run_reads_columns_and_numerics(run_dirs):
    run = curves.load_run(run_dirs[0])
    assert run.numerics == "int8" and run.name == "int8"
    assert set(COLUMNS) <= set(run.metrics)
    steps, losses = run.series("train/loss")
    assert len(steps) == STEPS and np.isfinite(losses).all()
    assert run.val_metrics == ["val/loss", "val/acc1"]
    assert run.final("val/acc1") == pytest.approx(0.85)


def test_numerics_falls_back_to_directory_name(tmp_path):
    run = curves.load_run(write_run(tmp_path / "my_run", "unused", config=False))
    assert run.numerics == "my_run"


def test_missing_metrics_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "metrics.csv")):
        curves.load_run(tmp_path)


@pytest.mark.parametrize("window", [1, 10])
def test_gap_of_scaled_loss_is_the_scale(run_dirs, window):
    # Smoothing is linear: 1.1 x the fp32 loss stays 1.1 x after it, a gap of exactly 0.1.
    int_run, fp_run = map(curves.load_run, run_dirs)
    assert curves.trajectory_gap(fp_run, int_run, smooth=window) == pytest.approx(0.1, rel=1e-9)
    assert curves.trajectory_gap(fp_run, fp_run, smooth=window) == 0.0


def test_gap_uses_common_steps_only(tmp_path, run_dirs):
    fp_run = curves.load_run(run_dirs[1])
    short = curves.load_run(run_dirs[0])
    half = short.metrics["step"] <= STEPS // 2
    truncated = curves.Run("short", "int8", short.path, {k: v[half] for k, v in short.metrics.items()})
    assert curves.trajectory_gap(fp_run, truncated, smooth=3) == pytest.approx(0.1, rel=1e-9)
    disjoint = curves.Run("late", "int8", short.path, {**short.metrics, "step": short.metrics["step"] + 1000})
    assert math.isnan(curves.trajectory_gap(fp_run, disjoint))


def test_moving_average_is_trailing():
    np.testing.assert_allclose(curves.moving_average(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1, 2, 4, 6])


def test_summary_deltas_against_fp32(tmp_path, run_dirs):
    runs = [curves.load_run(d) for d in run_dirs]
    summary = curves.summarize(runs, smooth=10)
    assert summary["reference"] == "fp32"
    int8, fp32 = summary["runs"]
    assert int8["delta"]["val/acc1"] == pytest.approx(-0.05)
    assert int8["trajectory_gap"] == pytest.approx(0.1)
    assert fp32["delta"]["val/acc1"] == 0.0 and fp32["trajectory_gap"] is None

    md, js = curves.write_summary(summary, tmp_path / "out" / "cmp")
    assert json.loads(js.read_text()) == summary
    text = md.read_text()
    assert "-0.05" in text and "0.1000" in text and "| fp32 |" in text

    png = curves.plot(runs, tmp_path / "out" / "cmp.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_reference_is_first_run_without_fp32(tmp_path):
    a = curves.load_run(write_run(tmp_path / "a", "int16", acc1=0.8))
    b = curves.load_run(write_run(tmp_path / "b", "int8", loss_scale=1.1, acc1=0.7))
    summary = curves.summarize([a, b])
    assert summary["reference"] == "int16"
    assert summary["runs"][1]["delta"]["val/acc1"] == pytest.approx(-0.1)


def test_cli_writes_default_outputs(run_dirs):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "compare_curves.py"), *map(str, run_dirs), "--smooth", "5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    exp = run_dirs[0].parent
    assert (exp / "comparison.png").stat().st_size > 0
    summary = json.loads((exp / "comparison.json").read_text())
    assert summary["smooth"] == 5 and summary["runs"][0]["trajectory_gap"] == pytest.approx(0.1)
    assert "val/acc1" in (exp / "comparison.md").read_text()



def test_cli_names_a_run_dir_without_metrics(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("compare_curves", ROOT / "scripts" / "compare_curves.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main([str(tmp_path / "nope")]) == 1
    assert str(tmp_path / "nope" / "metrics.csv") in capsys.readouterr().err


def seed_and_paired_runs(tmp_path, paired_scales):
    """Three seed runs whose losses are 1.0, 1.1 and 1.2 times one curve, and one paired run each,
    ``paired_scales`` times its seed run's."""
    seeds = [write_run(tmp_path / f"p1_s{i}", "int8", loss_scale=s, acc1=a)
             for i, (s, a) in enumerate([(1.0, 0.90), (1.1, 0.86), (1.2, 0.88)])]
    paired = [write_run(tmp_path / f"p2_s{i}", "int8", loss_scale=s * f, acc1=0.87)
              for i, (s, f) in enumerate(zip([1.0, 1.1, 1.2], paired_scales))]
    return seeds, paired


def test_seed_spread_is_every_pair_of_seeds_and_paired_runs_are_set_against_it(tmp_path):
    seeds, paired = seed_and_paired_runs(tmp_path, [1.05, 1.02, 1.03])
    summary = seed_spread.summarize([curves.load_run(d) for d in seeds], [curves.load_run(d) for d in paired])
    assert [(p["reference"], p["run"]) for p in summary["seed_pairs"]] == [
        ("p1_s0", "p1_s1"), ("p1_s0", "p1_s2"), ("p1_s1", "p1_s2")]
    assert [p["gap"] for p in summary["seed_pairs"]] == pytest.approx([0.1, 0.2, 0.1 / 1.1])
    assert summary["seed_gap"]["max"] == pytest.approx(0.2) and summary["seed_gap"]["n"] == 3
    assert [p["gap"] for p in summary["pairs"]] == pytest.approx([0.05, 0.02, 0.03])
    assert summary["within_seed_spread"] and summary["paired_below_seed_mean"] == 3
    assert summary["final_seed_range"]["val/acc1"] == pytest.approx(0.04)
    assert summary["final_paired_delta"]["val/acc1"]["max"] == pytest.approx(0.03)
    assert "**within**" in seed_spread.to_markdown(summary)

    seeds, paired = seed_and_paired_runs(tmp_path / "far", [1.05, 1.02, 1.5])
    summary = seed_spread.summarize([curves.load_run(d) for d in seeds], [curves.load_run(d) for d in paired])
    assert not summary["within_seed_spread"] and summary["paired_gap"]["max"] == pytest.approx(0.5)
    assert "**NOT within**" in seed_spread.to_markdown(summary)

    # Fewer paired runs than seeds: each against the seed run of its position.
    summary = seed_spread.summarize([curves.load_run(d) for d in seeds], [curves.load_run(paired[0])])
    assert [(p["reference"], p["run"]) for p in summary["pairs"]] == [("p1_s0", "p2_s0")]
    assert summary["seed_gap"]["n"] == 3 and summary["paired_gap"]["max"] == pytest.approx(0.05)


def test_cli_paired_with_writes_the_seed_spread_and_refuses_a_bad_pairing_in_one_line(tmp_path):
    seeds, paired = seed_and_paired_runs(tmp_path, [1.05, 1.02, 1.03])
    script = [sys.executable, str(ROOT / "scripts" / "compare_curves.py")]
    done = subprocess.run([*script, *map(str, seeds), "--paired-with", *map(str, paired)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    written = json.loads((tmp_path / "comparison-seed-spread.json").read_text())
    assert written["paired_gap"]["max"] == pytest.approx(0.05) and written["within_seed_spread"]
    assert "seed to seed" in (tmp_path / "comparison-seed-spread.md").read_text()
    assert len(json.loads((tmp_path / "comparison.json").read_text())["runs"]) == 6  # every run in the plot

    for seed_dirs, paired_dirs, message in [
            (seeds[:2], paired, "3 paired runs for 2 seed runs"),
            (seeds[:1], paired[:1], "a seed spread needs at least 2 runs of different seeds, got 1")]:
        refused = subprocess.run([*script, *map(str, seed_dirs), "--paired-with", *map(str, paired_dirs),
                                  "--out", str(tmp_path / "refused")], capture_output=True, text=True, timeout=120)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"compare_curves: {message}")
        assert not list(tmp_path.glob("refused*"))
