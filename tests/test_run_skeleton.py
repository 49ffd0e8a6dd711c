"""The pieces every task family's run shares: schemas, Hydra's errors in one line, the run
directory, the coverage step."""
from __future__ import annotations

import pytest
import yaml
from conftest import CONFIGS, SMALL_RESNET, compose, read_metrics, train_in_process

from intrain_core import available_presets
from tasks.common import cli, schema
from tasks.common.errors import ConfigError
from tasks.common.run_dir import discard_empty_dirs


def test_schemas_are_in_the_config_store_with_the_yaml_defaults():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    schema.register()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        stored = hydra_compose("schema/trainer").schema
    assert dict(stored) == yaml.safe_load((CONFIGS / "trainer" / "default.yaml").read_text())


def test_every_shipped_task_and_dataset_passes_its_schema(tmp_path):
    pairs = [(t.stem, "digits") for t in (CONFIGS / "task").glob("*.yaml")]
    pairs += [("faster_rcnn", d.stem) for d in (CONFIGS / "dataset").glob("*.yaml")]
    for task, dataset in pairs:
        root = ["dataset.root=/data"] if "root: ???" in (CONFIGS / "dataset" / f"{dataset}.yaml").read_text() else []
        schema.validate(compose(tmp_path, f"task={task}", f"dataset={dataset}", *root))
    for numerics in available_presets():
        schema.validate(compose(tmp_path, f"numerics={numerics}"))


@pytest.mark.parametrize("override,message", [
    ("task.warmup_epochs=-1", "task.warmup_epochs=-1: must be a finite number >= 0.0"),
    ("task.label_smoothing=1", "task.label_smoothing=1: must be a finite number >= 0.0 and < 1.0"),
    ("task.milestones=[a]", "task.milestones=['a']: must be a list of finite numbers"),
    ("trainer.progress_bar=maybe", "trainer.progress_bar=maybe: must be one of [auto, true, false]"),
    ("task.family=speech", "task.family=speech: must be one of [classification, detection, segmentation]"),
])
def test_schema_names_key_value_and_range(tmp_path, override, message):
    with pytest.raises(ConfigError) as info:
        schema.validate(compose(tmp_path, override))
    assert str(info.value) == message


def test_hydra_errors_become_one_line():
    from hydra.errors import MissingConfigException

    exc = MissingConfigException("In 'config': Could not find 'task/x'\n\nAvailable options in 'task':\n\ta\n\tb\n"
                                 "Config search path:\n\tprovider=hydra", missing_cfg_file="task/x")
    assert cli.one_line(exc) == "In 'config': Could not find 'task/x' Available options in 'task': a, b"


def test_discard_empty_dirs_stops_at_a_file_and_at_the_runs_dir(tmp_path):
    runs = tmp_path / "runs"
    (runs / "exp" / "run").mkdir(parents=True)
    (runs / "kept").mkdir()
    discard_empty_dirs(runs / "exp" / "run", runs)
    assert sorted(p.name for p in runs.iterdir()) == ["kept"]
    (tmp_path / "other" / "run").mkdir(parents=True)
    discard_empty_dirs(tmp_path / "other" / "run", runs)  # outside runs_dir: untouched
    assert (tmp_path / "other" / "run").is_dir()


def test_the_coverage_step_never_changes_training(runs_dir, monkeypatch):
    import tasks.classification.training as training

    common = ["numerics=int8", *SMALL_RESNET, "trainer.max_steps=3"]
    _, with_coverage = train_in_process(runs_dir, *common, "run_name=with")
    assert (with_coverage / "coverage.json").is_file()
    monkeypatch.setattr(training, "coverage_step", lambda *args: None)
    _, without = train_in_process(runs_dir, *common, "run_name=without")
    assert not (without / "coverage.json").exists()
    drop_time = [{k: v for k, v in r.items() if k != "time_s"} for r in read_metrics(with_coverage)]
    assert drop_time == [{k: v for k, v in r.items() if k != "time_s"} for r in read_metrics(without)]
