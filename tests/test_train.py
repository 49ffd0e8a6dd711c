"""train.py end to end: run layout, both numerics, resume determinism, errors a user can act on."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT, SMALL_RESNET, TINY, compose, read_metrics, run_dir_of, train_in_process, train_subprocess

from tasks.checkpoint import LAST, CheckpointError, load_checkpoint
from tasks.classification import build_model, epoch_order, load_pretrained, lr_factor_fn
from tasks.common.errors import ConfigError
from tasks.common.run_dir import RunDirError

VALUE_COLUMNS = ("step", "epoch", "train/loss", "train/acc1", "lr", "val/loss", "val/acc1", "val/acc5")


def values(rows):
    """metrics.csv rows without the wall-clock column."""
    return [{k: r[k] for k in VALUE_COLUMNS} for r in rows]


# --- the entry point, as a user runs it --------------------------------------------------------------
def test_multirun_puts_fp32_and_int8_side_by_side_and_compare_curves_reads_them(tmp_path):
    """`train.py -m numerics=fp32,int8`: the default task (ResNet-18, CIFAR stem), one experiment dir."""
    result = train_subprocess(tmp_path, "-m", "numerics=fp32,int8", *TINY, "trainer.max_steps=2",
                              f"runs_dir={tmp_path / 'runs'}")
    assert result.returncode == 0, result.stdout + result.stderr
    experiment = tmp_path / "runs" / "resnet18_digits"
    for name in ("fp32", "int8"):
        run_dir = experiment / name
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["numerics"]["name"] == name and config["trainer"]["seed"] == 0
        assert config["task"]["cifar_stem"] is True and config["task"]["model"] == "resnet18"
        rows = read_metrics(run_dir)
        assert list(rows[0]) == ["step", "epoch", "train/loss", "train/acc1", "lr", "train/nonfinite_skipped", "val/loss", "val/acc1",
                                 "val/acc5", "time_s"]
        assert [r["step"] for r in rows] == ["1", "2", "2"] and rows[-1]["val/acc1"] != ""
        assert (run_dir / LAST).is_file() and (run_dir / "train.log").is_file()
        info = yaml.safe_load((run_dir / "run_info.yaml").read_text())
        assert info["git_commit"] and info["run_name"] == name
    assert not (experiment / "fp32" / "coverage.txt").exists()
    report = json.loads((experiment / "int8" / "coverage.json").read_text())
    assert report["integer_mac_share"] > 0.9
    assert "integer MAC share" in (experiment / "int8" / "coverage.txt").read_text()

    compare = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_curves.py"),
                              str(experiment / "fp32"), str(experiment / "int8")],
                             capture_output=True, text=True, timeout=300)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    assert (experiment / "comparison.png").stat().st_size > 0


@pytest.mark.parametrize("group,bad,valid", [("task", "resnet19", ["resnet18", "vit", "deit_small"]),
                                             ("numerics", "int7", ["fp32", "int8", "int8_fwd", "int8_nearest"])])
def test_unknown_task_or_numerics_lists_the_valid_names(tmp_path, group, bad, valid):
    result = train_subprocess(tmp_path, f"{group}={bad}")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"Could not find '{group}/{bad}'" in output and f"Available options in '{group}'" in output
    assert all(name in output for name in valid)
    assert not (tmp_path / "runs").exists()


def test_nonexistent_dataset_path_is_named_without_a_traceback(tmp_path):
    missing = tmp_path / "no" / "cifar"
    result = train_subprocess(tmp_path, "dataset=cifar10", f"dataset.root={missing}", f"runs_dir={tmp_path / 'runs'}",
                              "trainer.device=cpu")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert str(missing) in output and "Traceback" not in output
    run_dir = tmp_path / "runs" / "resnet18_cifar10" / "int8"
    assert not any(run_dir.iterdir()) if run_dir.exists() else True  # nothing written


# --- in process (Hydra compose API + the runner) ------------------------------------------------------
def test_a_new_run_never_overwrites_an_existing_one(runs_dir):
    _, run_dir = train_in_process(runs_dir, "numerics=fp32", *SMALL_RESNET, "trainer.max_steps=2")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    with pytest.raises(RunDirError, match="trainer.resume=true") as info:
        train_in_process(runs_dir, "numerics=fp32", *SMALL_RESNET, "trainer.max_steps=2")
    assert str(run_dir) in str(info.value)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    # Resuming a finished run does nothing and changes nothing that was logged.
    train_in_process(runs_dir, "numerics=fp32", *SMALL_RESNET, "trainer.max_steps=2", "trainer.resume=true")
    assert (run_dir / "metrics.csv").read_bytes() == before["metrics.csv"]
    assert (run_dir / "config.yaml").read_bytes() == before["config.yaml"]


def test_int8_resume_at_an_epoch_boundary_is_bit_identical(runs_dir):
    """2 epochs in one go == 1 epoch, stop, resume for the second (cosine schedule with warmup)."""
    common = ["numerics=int8", *SMALL_RESNET, "trainer.max_epochs=2", "trainer.limit_train_batches=3",
              "task.warmup_epochs=0.5"]
    _, whole = train_in_process(runs_dir, *common, "run_name=whole")
    _, split = train_in_process(runs_dir, *common, "run_name=split", "trainer.stop_after_epochs=1")
    assert load_checkpoint(split / LAST)["step"] == 3
    train_in_process(runs_dir, *common, "run_name=split", "trainer.resume=true")
    assert values(read_metrics(split)) == values(read_metrics(whole))
    a, b = load_checkpoint(whole / LAST), load_checkpoint(split / LAST)
    assert a["step"] == b["step"] == 6
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    assert a["integer_context"]["stream"] == b["integer_context"]["stream"]


def test_int8_resume_in_the_middle_of_an_epoch_is_bit_identical(runs_dir):
    common = ["numerics=int8", *SMALL_RESNET, "trainer.limit_train_batches=3", "task.schedule=constant"]
    _, whole = train_in_process(runs_dir, *common, "run_name=whole", "trainer.max_steps=5")
    _, split = train_in_process(runs_dir, *common, "run_name=split", "trainer.max_steps=4")
    assert load_checkpoint(split / LAST)["batch_in_epoch"] == 1
    train_in_process(runs_dir, *common, "run_name=split", "trainer.max_steps=5", "trainer.resume=true")
    train_rows = [r for r in values(read_metrics(split)) if r["train/loss"]]
    assert train_rows == [r for r in values(read_metrics(whole)) if r["train/loss"]]
    assert values(read_metrics(split))[-1] == values(read_metrics(whole))[-1]  # the final validation


def test_vit_trains_on_digits_in_both_numerics(runs_dir):
    for numerics in ("fp32", "int8"):
        result, run_dir = train_in_process(runs_dir, "task=vit", f"numerics={numerics}", "trainer.max_steps=2",
                                           "dataset.image_size=16")
        assert run_dir.parts[-2:] == ("vit_digits", numerics)
        rows = read_metrics(run_dir)
        assert all(float(r["train/loss"]) > 0 for r in rows if r["train/loss"]) and "val/acc1" in result
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["task"]["model"] == "vit_tiny_patch16_224" and config["task"]["patch_size"] == 4
    assert json.loads((run_dir / "coverage.json").read_text())["integer_mac_share"] > 0.9


def test_wandb_offline_runs_of_one_experiment_share_a_group(runs_dir, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for numerics in ("fp32", "int8"):
        train_in_process(runs_dir, f"numerics={numerics}", *SMALL_RESNET, "trainer.max_steps=1", "logger=wandb",
                         "logger.mode=auto", "experiment_name=wandb_check", f"logger.project=intrain-test")
    # wandb's service process writes the offline records on its own time; a user's process
    # exit shuts it down and so flushes them, and here its teardown does the same.
    import wandb

    wandb.teardown()
    for numerics in ("fp32", "int8"):
        run_dir = runs_dir / "wandb_check" / numerics
        info = yaml.safe_load((run_dir / "run_info.yaml").read_text())["wandb"]
        assert info["mode"] == "offline" and info["group"] == "wandb_check" and info["name"] == numerics
        (log_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
        record = log_file.read_bytes()
        assert b"wandb_check" in record and b"label_smoothing" in record  # the group and the config
    tables = list((runs_dir / "wandb_check" / "int8" / "wandb").glob("offline-run-*/files/media/table/coverage/ops_*.table.json"))
    assert tables and "batch_norm" in tables[0].read_text()


def test_wandb_auto_mode_is_offline_without_credentials(tmp_path, monkeypatch):
    from tasks.run_logging import wandb_logged_in, wandb_mode

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not wandb_logged_in() and wandb_mode("auto") == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n")
    (tmp_path / "netrc").chmod(0o600)
    assert wandb_logged_in() and wandb_mode("auto") == "online"
    with pytest.raises(ValueError, match="disabled"):
        wandb_mode("sometimes")


# --- pieces -----------------------------------------------------------------------------------------
def test_cifar_stem_and_zoo_doors():
    resnet = build_model({"model": "resnet18", "zoo": "torchvision", "cifar_stem": True}, 10, 3, 32)
    assert resnet.conv1.kernel_size == (3, 3) and resnet.conv1.stride == (1, 1)
    assert isinstance(resnet.maxpool, torch.nn.Identity)
    mobilenet = build_model({"model": "mobilenet_v2", "zoo": "torchvision", "cifar_stem": True}, 10, 3, 32)
    assert mobilenet.features[0][0].stride == (1, 1)
    vit = build_model({"model": "vit_tiny_patch16_224", "zoo": "timm", "patch_size": 4}, 10, 3, 32)
    assert vit.patch_embed.num_patches == 64
    for model in (resnet, mobilenet, vit):
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ConfigError, match="resnet18"):
        build_model({"model": "resnet81", "zoo": "torchvision"}, 10, 3, 32)


def test_pretrained_weights_load_skipping_a_mismatched_head(tmp_path):
    from safetensors.torch import save_file

    task = {"model": "test_vit", "zoo": "timm", "patch_size": 4}
    source = build_model(task, 5, 3, 16)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "w.pth")
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    for name in ("w.pth", "w.safetensors"):
        target = build_model(task, 10, 3, 16)
        load_pretrained(target, tmp_path / name, num_classes=10)
        assert torch.equal(target.patch_embed.proj.weight, source.patch_embed.proj.weight)
        assert target.head.weight.shape == (10, source.head.in_features)

    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(build_model(task, 10, 3, 16), tmp_path / "missing.pth", 10)
    (tmp_path / "bad.pth").write_bytes(b"garbage" * 100)
    with pytest.raises(CheckpointError, match="corrupt") as info:
        load_pretrained(build_model(task, 10, 3, 16), tmp_path / "bad.pth", 10)
    assert "bad.pth" in str(info.value)
    resnet = build_model({"model": "resnet18", "zoo": "torchvision", "cifar_stem": True}, 10, 3, 32)
    with pytest.raises(CheckpointError, match="missing keys|unexpected keys"):
        load_pretrained(resnet, tmp_path / "w.pth", 10)


def test_data_order_depends_on_seed_and_epoch_only():
    assert epoch_order(100, 0, 3) == epoch_order(100, 0, 3)
    assert epoch_order(100, 0, 3) != epoch_order(100, 0, 4) != epoch_order(100, 1, 3)


def test_schedule_warmup_cosine_and_step():
    cosine = lr_factor_fn({"warmup_epochs": 1, "schedule": "cosine"}, steps_per_epoch=10, total_steps=50)
    assert [cosine(s) for s in (0, 9)] == [0.1, 1.0] and cosine(10) == 1.0
    assert cosine(49) < 0.01 and all(cosine(s) >= cosine(s + 1) for s in range(10, 49))
    step = lr_factor_fn({"schedule": "step", "milestones": [2, 4], "gamma": 0.1}, steps_per_epoch=10, total_steps=50)
    assert [step(s) for s in (19, 20, 40)] == [1.0, 0.1, pytest.approx(0.01)]
    with pytest.raises(ConfigError, match="cosine"):
        lr_factor_fn({"schedule": "linear"}, 10, 50)


def test_configs_compose_for_every_task(tmp_path):
    for task in ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "vit", "deit_small"):
        cfg = compose(tmp_path, f"task={task}")
        assert cfg.task.name == task and run_dir_of(cfg) == tmp_path / f"{task}_digits" / "int8"
        assert cfg.numerics.seed == cfg.trainer.seed
