"""Re-scoring a finished run under other presets and rounding seeds (scripts/evaluate.py)."""
import importlib.util

import pytest

from conftest import ROOT, SMALL_RESNET, read_metrics, train_in_process
from tasks.checkpoint import LAST, load_checkpoint, save_checkpoint
from tasks.common.errors import ConfigError
from tasks.reevaluation import evaluate_run, summarise, write_summary


def test_fp32_rescore_reproduces_the_logged_final_and_integer_passes_are_seeded(runs_dir):
    _, run_dir = train_in_process(runs_dir, "numerics=fp32", *SMALL_RESNET, "trainer.max_steps=2")
    logged = [r for r in read_metrics(run_dir) if r["val/acc1"]][-1]
    evaluations = evaluate_run(run_dir, ["fp32", "int8"], [0, 1, 0])
    fp32, *int8 = evaluations
    assert (fp32.evaluated_with, fp32.rounding_seed) == ("fp32", None)
    # The same float computation on the same weights and batches as the run's last validation.
    assert fp32.metrics["val/acc1"] == float(logged["val/acc1"])
    assert fp32.metrics["val/loss"] == pytest.approx(float(logged["val/loss"]), rel=1e-6)
    assert [e.rounding_seed for e in int8] == [0, 1, 0]
    assert int8[0].metrics == int8[2].metrics  # one rounding seed, one result
    assert int8[0].metrics["val/loss"] != int8[1].metrics["val/loss"]  # another seed, another draw

    rows = summarise(evaluations)
    assert [(r["evaluated_with"], r["passes"]) for r in rows] == [("fp32", 1), ("int8", 3)]
    losses = [e.metrics["val/loss"] for e in int8]
    assert (rows[1]["val/loss_min"], rows[1]["val/loss_max"]) == (min(losses), max(losses))
    md, csv_path = write_summary(rows, runs_dir / "summary", "python scripts/evaluate.py x")
    assert "| int8 | 3 |" in md.read_text() and csv_path.read_text().startswith("run,trained_with")


def test_unknown_presets_and_families_are_refused(runs_dir):
    _, run_dir = train_in_process(runs_dir, "numerics=fp32", *SMALL_RESNET, "trainer.max_steps=1")
    with pytest.raises(ValueError, match="int7"):
        evaluate_run(run_dir, ["int7"], [0])
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("family: classification", "family: speech"))
    with pytest.raises(ConfigError, match="re-evaluation covers"):
        evaluate_run(run_dir, ["fp32"], [0])


@pytest.mark.parametrize("task,dataset,metric", [("faster_rcnn", "digits_det", "val/bbox_mAP"),
                                                 ("deeplabv3", "digits_seg", "val/mIoU")])
def test_detection_and_segmentation_runs_are_rescored(runs_dir, tmp_path_factory, monkeypatch, task, dataset, metric):
    pytest.importorskip("mmdet" if task == "faster_rcnn" else "mmseg")
    monkeypatch.setenv("INTRAIN_DATA_CACHE", str(tmp_path_factory.getbasetemp() / "data"))
    tiny = [f"task={task}", f"dataset={dataset}", "dataset.image_size=64", "dataset.num_train=8",
            "dataset.num_val=4", "trainer.batch_size=2", "trainer.eval_batch_size=2", "trainer.max_steps=2",
            "trainer.device=auto", "task.warmup_iters=0", "numerics=int8"]
    _, run_dir = train_in_process(runs_dir, *tiny)
    logged = [r for r in read_metrics(run_dir) if r.get(metric)][-1]
    evaluations = evaluate_run(run_dir, ["fp32", "int8"], [0, 1])
    assert [(e.evaluated_with, e.rounding_seed) for e in evaluations] == [("fp32", None), ("int8", 0), ("int8", 1)]
    assert all(set(e.metrics) == {metric} for e in evaluations)
    assert {e.trained_with for e in evaluations} == {"int8"} and float(logged[metric]) >= 0
    rows = summarise(evaluations)
    assert rows[1]["passes"] == 2 and rows[1][f"{metric}_min"] <= rows[1][f"{metric}_max"]


def test_cli_names_a_missing_checkpoint(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "scripts" / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main([str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'} has no config.yaml: not a run directory" in capsys.readouterr().err
