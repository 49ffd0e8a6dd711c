"""scripts/diagnostics: the trace summary on a small synthetic trace; the OpenMMLab tools on a tiny run."""
from __future__ import annotations

import csv
import importlib.util

import pytest
from conftest import ROOT


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "diagnostics" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def test_summarise_trace_finds_the_gain_burst_and_prints_the_spike_steps(tmp_path, capsys):
    trace = tmp_path / "int8"
    trace.mkdir()
    bn = [[s, "head.bn", 4, "0.0000", 1.0] for s in range(1, 11)] + [[s, "pool.bn", 4, "0.25" if s == 5 else "0",
                                                                          1e4 if s == 5 else 2.0] for s in range(1, 11)]
    write(trace / "bn.csv", ["step", "layer", "values_per_channel", "channels_below_one_step", "backward_gain"], bn)
    write(trace / "params.csv", ["step", "param", "grad_norm", "grad_absmax", "weight_norm", "update_norm"],
          [[s, "backbone.w", 3.0, 1, 1, 1] for s in range(1, 11)])
    write(trace / "metrics.csv", ["step", "train/loss"], [[s, 1.0 + (s == 5) * 9] for s in range(1, 11)])
    load("summarise_trace").main(["4", "6", str(trace), "--layer", "pool.bn"])
    out = capsys.readouterr().out
    assert "pool.bn: median gain 2, max 1e+04; steps with a channel within one 8-bit step: 1; " \
           "gain > 50x median at: 5 (10000)" in out
    assert "head.bn" not in out.split("step  loss")[0]  # no burst, no collapsed channel: not listed
    assert "   5  10.000" in out and out.count("\n   ") == 3


def test_trace_and_weight_scores_of_a_tiny_segmentation_run(runs_dir, tmp_path, tmp_path_factory, monkeypatch):
    pytest.importorskip("mmseg")
    from conftest import train_in_process

    monkeypatch.setenv("INTRAIN_DATA_CACHE", str(tmp_path_factory.getbasetemp() / "data"))
    _, run_dir = train_in_process(runs_dir, "task=deeplabv3", "dataset=digits_seg", "dataset.image_size=64",
                                  "dataset.num_train=8", "dataset.num_val=4", "trainer.batch_size=2",
                                  "trainer.eval_batch_size=4", "task.warmup_iters=0", "trainer.max_steps=2",
                                  "trainer.device=auto", "numerics=int8")
    assert load("trace_steps").main([str(run_dir), str(tmp_path / "trace"), "--steps", "2"]) == 0
    assert (tmp_path / "trace" / "bn.csv").read_text().count("\n") > 1
    load("score_weights").main([str(run_dir), "--presets", "fp32", "int8", "--batches", "1", "--batch-size", "2"])
