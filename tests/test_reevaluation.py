"""Re-scoring a finished run under other presets and rounding seeds (scripts/evaluate.py)."""
import importlib.util

import pytest

from conftest import ROOT, SMALL_RESNET, read_metrics, train_in_process
from tasks.checkpoint import LAST, load_checkpoint, save_checkpoint
from tasks.classification import ConfigError
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


def test_non_classification_runs_and_unknown_presets_are_refused(runs_dir):
    _, run_dir = train_in_process(runs_dir, "numerics=fp32", *SMALL_RESNET, "trainer.max_steps=1")
    with pytest.raises(ValueError, match="int7"):
        evaluate_run(run_dir, ["int7"], [0])
    state = load_checkpoint(run_dir / LAST)
    state["config"]["task"]["family"] = "detection"
    save_checkpoint(run_dir / LAST, state)
    with pytest.raises(ConfigError, match="classification runs only"):
        evaluate_run(run_dir, ["fp32"], [0])


def test_cli_names_a_missing_checkpoint(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "scripts" / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main([str(tmp_path / "nope")]) == 2
    assert f"no checkpoint at {tmp_path / 'nope' / 'last.ckpt'}" in capsys.readouterr().err
