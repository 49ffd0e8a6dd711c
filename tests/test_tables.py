"""Paper tables: every table spec is valid, paper-scale settings build, aggregation is correct."""
from __future__ import annotations

import csv
import dataclasses
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from tasks import tables
from tasks.run_logging import MetricsCSV, git_dirty
from tasks.tables import spec

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "configs" / "experiment"
RESULTS = ROOT / "results"


def test_every_table_has_both_scales_and_fp32():
    assert set(tables.TABLES) == {"classification", "detection", "segmentation", "ablation"}
    for name in tables.TABLES:
        for scale in tables.SCALES:
            table = tables.load_table(name, scale)
            assert table.rows and "fp32" in table.presets and table.hardware
            assert all(row.metric.startswith("val/") and row.minutes > 0 for row in table.rows)
    ablation = tables.load_table("ablation", "mini")
    assert {"int8", "int16", "int8_nearest", "int8_fwd"} <= set(ablation.presets)
    assert {row.task for row in ablation.rows} == {"resnet18", "vit"}
    metrics = {tables.load_table(name, "mini").rows[0].metric for name in ("detection", "segmentation")}
    assert metrics == {"val/bbox_mAP", "val/mIoU"}  # each family's validation metric


def test_every_row_is_an_experiment_config_and_every_experiment_a_row():
    rows = {row.experiment for name in tables.TABLES for scale in tables.SCALES
            for row in tables.load_table(name, scale).rows}
    files = {str(p.relative_to(EXPERIMENTS).with_suffix("")) for p in EXPERIMENTS.rglob("*.yaml")}
    assert rows == files


def test_a_table_row_holds_no_setting_and_a_missing_experiment_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(spec, "TABLES_DIR", tmp_path)
    monkeypatch.setattr(spec, "TABLES", ("classification",))
    text = "presets: [fp32]\nscales:\n  mini:\n    rows:\n      resnet18_digits: {overrides: [task=vit]}\n"
    (tmp_path / "classification.yaml").write_text(text)
    with pytest.raises(ValueError, match=r"\['overrides'\] is not a row key.*configs/experiment/classification/"):
        tables.load_table("classification", "mini")
    (tmp_path / "classification.yaml").write_text(text.replace("resnet18_digits: {overrides: [task=vit]}",
                                                               "resnet19_digits: {}"))
    with pytest.raises(ValueError, match="row resnet19_digits: .*experiment/classification/resnet19_digits"):
        tables.load_table("classification", "mini")


@pytest.mark.parametrize("name", ["classification", "ablation", "detection", "segmentation"])
def test_committed_runs_were_trained_with_their_experiment_config(name):
    # Every setting a committed run recorded is what its experiment composes today (keys added since
    # are absent from the old config.yaml; progress_bar is the queue's console choice).
    table = tables.load_table(name, "mini")
    for row in table.rows:
        for preset, run_name, extra in table.runs(row):
            recorded = yaml.safe_load((RESULTS / name / "runs" / row.name / run_name / "config.yaml").read_text())
            composed = OmegaConf.to_container(tables.compose_row(row.experiment, f"numerics={preset}", *extra),
                                              resolve=True)
            for section in ("task", "dataset", "trainer", "numerics"):
                differ = {key: (value, composed[section].get(key)) for key, value in recorded[section].items()
                          if key != "progress_bar" and composed[section].get(key) != value}
                assert not differ, f"{name}/{row.name}/{run_name} {section}: recorded, composed = {differ}"


@pytest.mark.parametrize("name", ["classification", "ablation", "detection", "segmentation"])
def test_aggregating_the_committed_runs_again_gives_the_committed_table(tmp_path, name):
    table = tables.load_table(name, "mini")
    runs_dir = tmp_path / "runs"
    shutil.copytree(RESULTS / name / "runs", runs_dir)
    for run_dir in runs_dir.glob("*/*"):
        (run_dir / tables.DONE).write_text("0 s\n")  # the committed runs all finished
    out = tmp_path / "results"
    (out / name).mkdir(parents=True)
    shutil.copyfile(RESULTS / name / "notes.md", out / name / "notes.md")
    md, csv_path = tables.aggregate(table, runs_dir, out, f"make table-{name} SCALE=mini")
    assert csv_path.read_text() == (RESULTS / f"{name}.csv").read_text()
    aggregated_at = re.compile(r"^Aggregated at commit `\w+`, [\d-]+;", re.M)
    committed = (RESULTS / f"{name}.md").read_text()
    assert aggregated_at.sub("", md.read_text()) == aggregated_at.sub("", committed)
    assert (RESULTS / name / "notes.md").read_text() in md.read_text()  # the notes sit under the table


def test_unknown_table_or_scale_lists_the_valid_names():
    with pytest.raises(ValueError, match="classification"):
        tables.load_table("classifcation", "mini")
    with pytest.raises(ValueError, match="paper"):
        tables.load_table("classification", "huge")


@pytest.mark.parametrize("name", ["classification", "ablation"])
def test_paper_scale_classification_builds_without_data(tmp_path, name):
    built = tables.dry_run(tables.load_table(name, "paper"), tmp_path)
    table = tables.load_table(name, "paper")
    assert len(built) == len(table.rows) * len(table.presets)
    assert any("IntSGD" in line for line in built) and any("SGD" in line for line in built)
    assert any(line.startswith("vit_base_patch16_224: 85.") for line in built)  # ViT-B/16


@pytest.mark.parametrize("name", ["detection", "segmentation"])
def test_paper_scale_openmmlab_builds_without_data(tmp_path, name):
    pytest.importorskip("mmdet")
    pytest.importorskip("mmseg")
    built = tables.dry_run(tables.load_table(name, "paper"), tmp_path)
    assert built and all(line.endswith(("IntSGD", "SGD")) for line in built)


def _fake_run(run_dir, preset, losses, accuracies):
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"numerics:\n  name: {preset}\n")
    metrics = MetricsCSV(run_dir / "metrics.csv")
    for step, loss in enumerate(losses, 1):
        metrics.write({"step": step, "epoch": 0, "train/loss": loss, "time_s": 6.0 * step})
    for step, acc in accuracies:
        metrics.write({"step": step, "epoch": 0, "val/acc1": acc})
    metrics.close()


def test_aggregate_writes_deltas_and_gaps_from_the_runs(tmp_path):
    table = tables.load_table("classification", "mini")
    row = table.rows[0]
    runs_dir = tmp_path / "runs"
    fp_losses, int_losses = [2.0] * 20, [2.2] * 20  # a constant 10% gap
    _fake_run(runs_dir / row.name / "fp32", "fp32", fp_losses, [(10, 90.0), (20, 97.5)])
    _fake_run(runs_dir / row.name / "int8", "int8", int_losses, [(10, 88.0), (20, 96.0)])
    (runs_dir / row.name / "int8" / "run_info.yaml").write_text("git_commit: abcdef123456\ngit_dirty: true\n")
    md, csv_path = tables.aggregate(table, runs_dir, tmp_path / "results", "make table-classification SCALE=mini")
    (record,) = list(csv.DictReader(open(csv_path)))
    assert record["row"] == row.name and record["metric"] == "val/acc1"
    assert float(record["fp32"]) == 97.5 and float(record["int8"]) == 96.0
    assert float(record["delta"]) == pytest.approx(-1.5)
    assert float(record["trajectory_gap"]) == pytest.approx(0.1)
    assert math.isclose(float(record["minutes"]), 2 * 120 / 60)
    text = md.read_text()
    assert "make table-classification SCALE=mini" in text and f"{row.name}.png" in text
    assert "Runs trained at commit `abcdef1+` (+: with uncommitted changes)" in text
    assert "Not run yet" in text and table.rows[1].name in text  # the missing row is named, not dropped
    assert (tmp_path / "results" / "classification" / f"{row.name}.png").stat().st_size > 0
    assert (tmp_path / "results" / "classification" / "runs" / row.name / "int8" / "metrics.csv").is_file()


def test_a_finished_run_of_another_setting_is_not_taken_as_this_row(tmp_path):
    table = tables.load_table("classification", "mini")
    run_dir = table.run_dir(tmp_path, table.rows[0], "fp32")
    run_dir.mkdir(parents=True)
    (run_dir / tables.DONE).write_text("60 s\ntask=resnet18 trainer.max_epochs=1\n")
    with pytest.raises(RuntimeError, match="delete that run directory"):
        tables.run_table(table, tmp_path)


def test_a_row_whose_gpus_do_not_divide_its_global_batch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(spec, "TABLES_DIR", tmp_path)
    monkeypatch.setattr(spec, "TABLES", ("classification",))
    text = "presets: [fp32]\nscales:\n  mini:\n    rows:\n      resnet18_digits: {gpus: GPUS}\n"
    (tmp_path / "classification.yaml").write_text(text.replace("GPUS", "4"))  # batch 32
    assert tables.load_table("classification", "mini").rows[0].gpus == 4
    (tmp_path / "classification.yaml").write_text(text.replace("GPUS", "3"))
    with pytest.raises(ValueError, match=r"gpus: 3 does not divide the global trainer.batch_size=32"):
        tables.load_table("classification", "mini")
    (tmp_path / "classification.yaml").write_text(text.replace("GPUS", "0"))
    with pytest.raises(ValueError, match="gpus must be a positive whole number, got 0"):
        tables.load_table("classification", "mini")


def test_paper_rows_state_their_gpus():
    gpus = {name: {row.gpus for row in tables.load_table(name, "paper").rows} for name in tables.TABLES}
    assert gpus == {"classification": {1}, "ablation": {1}, "detection": {8}, "segmentation": {4}}
    assert {row.gpus for name in tables.TABLES for row in tables.load_table(name, "mini").rows} == {1}


def test_select_rows_keeps_only_the_named_rows_and_rejects_unknown_ones():
    table = tables.load_table("classification", "mini")
    first = table.rows[0].name
    assert [row.name for row in tables.select_rows(table, [first]).rows] == [first]
    with pytest.raises(ValueError, match=first):
        tables.select_rows(table, ["no_such_row"])


def test_seed_runs_give_the_noise_floor_and_the_delta_of_means(tmp_path):
    mini = tables.load_table("classification", "mini")
    row = dataclasses.replace(mini.rows[0], seeds=(("fp32", (1,)), ("int8", (1,))))
    table = dataclasses.replace(mini, rows=(row,))
    assert ("fp32", "fp32-seed1", ("trainer.seed=1",)) in table.runs(row)
    assert ("int8", "int8-seed1", ("trainer.seed=1",)) in table.runs(row)
    runs_dir = tmp_path / "runs"
    _fake_run(runs_dir / row.name / "fp32", "fp32", [2.0] * 20, [(20, 97.5)])
    _fake_run(runs_dir / row.name / "int8", "int8", [2.2] * 20, [(20, 96.0)])
    _, csv_path = tables.aggregate(table, runs_dir, tmp_path / "results", "make")
    (record,) = list(csv.DictReader(open(csv_path)))
    assert record["fp32_seed_spread"] == "" and record["delta_seed_mean"] == ""  # seed runs not run yet
    _fake_run(runs_dir / row.name / "fp32-seed1", "fp32", [2.1] * 20, [(20, 95.0)])
    _fake_run(runs_dir / row.name / "int8-seed1", "int8", [2.1] * 20, [(20, 97.0)])
    _, csv_path = tables.aggregate(table, runs_dir, tmp_path / "results", "make")
    assert next(csv.DictReader(open(csv_path)))["fp32_seed_spread"] == ""  # metrics, but not finished
    for seed_run in ("fp32-seed1", "int8-seed1"):
        (runs_dir / row.name / seed_run / tables.DONE).write_text("1 s\n")
    md, csv_path = tables.aggregate(table, runs_dir, tmp_path / "results", "make")
    (record,) = list(csv.DictReader(open(csv_path)))
    assert float(record["fp32_seed_spread"]) == pytest.approx(2.5)
    assert float(record["int8_seed_spread"]) == pytest.approx(1.0)
    assert float(record["delta_seed_mean"]) == pytest.approx((96.0 + 97.0) / 2 - (97.5 + 95.0) / 2)
    assert "delta_seed_mean" in md.read_text()
    assert (tmp_path / "results" / "classification" / "runs" / row.name / "int8-seed1" / "metrics.csv").is_file()


def _fake_train_command(timeline, fail_run=None):
    """A train.py stand-in: notes when it runs and with how many threads, fails for ``fail_run``."""
    script = ("import os, sys, time; from pathlib import Path\n"
              "run_dir, timeline, fail = Path(sys.argv[1]), sys.argv[2], sys.argv[3]\n"
              "start = time.time(); time.sleep(1.0)\n"
              "open(timeline, 'a').write(f\"{run_dir.name} {start} {time.time()} {os.environ.get('OMP_NUM_THREADS')}\\n\")\n"
              "if run_dir.name == fail: print('boom'); sys.exit(3)\n"
              "run_dir.mkdir(parents=True, exist_ok=True)\n")

    def command(row, preset, run_name, extra, runs_dir, resume, launcher=None):
        return [sys.executable, "-c", script, str(runs_dir / row.name / run_name), str(timeline), str(fail_run)]
    return command


def test_parallel_jobs_overlap_and_report_every_failure_at_the_end(tmp_path, monkeypatch):
    mini = tables.load_table("classification", "mini")
    row = dataclasses.replace(mini.rows[0], seeds=(("fp32", (1,)),))
    table = dataclasses.replace(mini, rows=(row,))
    timeline = tmp_path / "timeline.txt"
    monkeypatch.setattr(tables.queue, "train_command", _fake_train_command(timeline, fail_run="int8"))
    monkeypatch.setattr(tables.queue.os, "cpu_count", lambda: 4)
    with pytest.raises(RuntimeError, match=r"1 of 3 runs failed: \[classification\] \S+ int8 .*int8\.console\.log"):
        tables.run_table(table, tmp_path, jobs=2)
    spans = {name: (float(a), float(b), threads)
             for name, a, b, threads in (line.split() for line in timeline.read_text().splitlines())}
    assert set(spans) == {"fp32", "int8", "fp32-seed1"} and {s[2] for s in spans.values()} == {"2"}
    first, second = spans["fp32"], spans["int8"]
    assert first[0] < second[1] and second[0] < first[1]  # the first two ran at the same time
    assert "boom" in (tmp_path / row.name / "int8.console.log").read_text()
    done = {run for run in ("fp32", "int8", "fp32-seed1") if (tmp_path / row.name / run / tables.DONE).is_file()}
    assert done == {"fp32", "fp32-seed1"}  # the failure did not stop the run queued after it

    timeline.unlink()
    monkeypatch.setattr(tables.queue, "train_command", _fake_train_command(timeline))
    tables.run_table(table, tmp_path, jobs=2)
    assert [line.split()[0] for line in timeline.read_text().splitlines()] == ["int8"]  # only what had failed


def test_rewritten_results_do_not_mark_a_tree_dirty(tmp_path):
    # Runs of a queue start after earlier tables rewrote results/: their commit is still clean.
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table.md").write_text("old\n")
    (tmp_path / "train.py").write_text("old\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    assert git_dirty(tmp_path) is False
    (tmp_path / "results" / "table.md").write_text("new\n")
    assert git_dirty(tmp_path) is False
    (tmp_path / "train.py").write_text("new\n")
    assert git_dirty(tmp_path) is True


def test_the_dry_run_command_builds_a_paper_table_and_a_bad_row_is_one_line(tmp_path):
    pytest.importorskip("mmseg")
    command = [sys.executable, str(ROOT / "scripts" / "run_table.py"), "segmentation", "--scale", "paper",
               "--runs-dir", str(tmp_path)]
    done = subprocess.run([*command, "--dry-run"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    built = done.stdout.splitlines()
    assert len(built) == 4 and sum(line.endswith(": IntSGD") for line in built) == 2
    assert "cityscapes" in built[-1]  # the Cityscapes row's own zoo config
    refused = subprocess.run([*command, "--rows", "deeplabv3_r50_ade"], capture_output=True, text=True, cwd=tmp_path)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()] and "deeplabv3_r50_voc" in refused.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def _run_table_script(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "run_table.py"), *args], capture_output=True,
                          text=True, cwd=cwd)


def test_dry_run_prints_the_torchrun_and_slurm_command_of_every_run_and_runs_nothing(tmp_path):
    runs = tmp_path / "runs"
    killed = runs / "faster_rcnn_r50_coco" / "int8"
    killed.mkdir(parents=True)
    (killed / "last.ckpt").write_bytes(b"")  # a killed run: its command resumes it
    done = _run_table_script("detection", "--scale", "paper", "--runs-dir", str(runs), "--launcher", "torchrun",
                             "--dry-run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 4  # 2 rows x 2 presets
    train = f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node=8 {ROOT / 'train.py'} "
    assert all(line.startswith(train) for line in lines)
    assert lines[1] == train + (f"experiment=detection/faster_rcnn_r50_coco numerics=int8 runs_dir={runs} "
                                "experiment_name=faster_rcnn_r50_coco run_name=int8 trainer.progress_bar=false "
                                "trainer.resume=true")
    assert sum("trainer.resume=true" in line for line in lines) == 1

    done = _run_table_script("segmentation", "--scale", "paper", "--runs-dir", str(runs), "--launcher", "slurm",
                             "--partition", "gpu", "--rows", "deeplabv3_r50_voc", "--dry-run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    slurm = (f"{sys.executable} {ROOT / 'train.py'} -m hydra/launcher=slurm hydra.launcher.nodes=1 "
             "hydra.launcher.gpus_per_node=4 hydra.launcher.partition=gpu experiment=segmentation/deeplabv3_r50_voc ")
    assert done.stdout.splitlines() == [slurm + f"numerics={p} runs_dir={runs} experiment_name=deeplabv3_r50_voc "
                                        f"run_name={p} trainer.progress_bar=false" for p in ("fp32", "int8")]
    assert sorted(p.relative_to(runs).as_posix() for p in runs.rglob("*")) == [
        "faster_rcnn_r50_coco", "faster_rcnn_r50_coco/int8", "faster_rcnn_r50_coco/int8/last.ckpt"]


@pytest.mark.parametrize("args, message", [
    (["--launcher", "mpirun"], "run_table: unknown launcher 'mpirun'; launchers: local, torchrun, slurm"),
    (["--launcher", "torchrun", "--jobs", "2"], "run_table: --jobs 2 with the torchrun launcher would start 2 runs"),
    (["--launcher", "torchrun", "--partition", "gpu"], "run_table: a partition is for the slurm launcher"),
])
def test_a_bad_launcher_choice_is_one_line_and_exit_1(tmp_path, args, message):
    refused = _run_table_script("classification", "--scale", "paper", "--runs-dir", str(tmp_path / "runs"), *args,
                                "--dry-run", cwd=tmp_path)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith(message) and len(refused.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_the_slurm_command_gives_hydras_launcher_the_rows_gpus():
    from hydra import compose, initialize_config_dir

    row = tables.load_table("detection", "paper").rows[0]
    command = tables.train_command(row, "int8", "int8", (), Path("/runs"), False, launcher=tables.Launcher("slurm"))
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=command[command.index("-m") + 1:], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition is None
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (1, 8, 8)
    # The one-job sweep writes where the queue looks for the run, with the whole global batch.
    assert Path(cfg.hydra.sweep.dir) / cfg.hydra.sweep.subdir == Path("/runs/faster_rcnn_r50_coco/int8")
    assert cfg.trainer.batch_size == 16


def test_run_table_starts_each_run_through_its_launcher(tmp_path, monkeypatch):
    started = []

    def fake_run(command, **kwargs):
        started.append(command)
        value = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in command if "=" in a}
        (Path(value["runs_dir"]) / value["experiment_name"] / value["run_name"]).mkdir(parents=True)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(tables.queue.subprocess, "run", fake_run)
    table = tables.select_rows(tables.load_table("segmentation", "paper"), ["deeplabv3_r50_cityscapes"])
    tables.run_table(table, tmp_path, launcher=tables.Launcher("torchrun"))
    assert [c[:5] for c in started] == [[sys.executable, "-m", "torch.distributed.run", "--standalone",
                                         "--nproc_per_node=4"]] * 2
    assert all((tmp_path / "deeplabv3_r50_cityscapes" / p / tables.DONE).is_file() for p in ("fp32", "int8"))
