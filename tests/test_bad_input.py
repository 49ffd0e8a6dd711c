"""Every bad input a user can give train.py: one line, exit status 1, no traceback, nothing written."""
from __future__ import annotations

import pytest
from conftest import SMALL_RESNET, TINY, train_subprocess

# (overrides, what the one line must say)
BAD_INPUTS = [
    (["trainer.batch_size=0"], "trainer.batch_size=0: must be an integer >= 1"),
    (["trainer.batch_size=abc"], "trainer.batch_size=abc: must be an integer"),
    (["trainer.batch_size=100000"], "no full batch"),
    (["trainer.eval_batch_size=0"], "trainer.eval_batch_size=0"),
    (["trainer.max_steps=-1"], "trainer.max_steps=-1: must be an integer >= 1 or null"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0"),
    (["trainer.device=banana"], "trainer.device=banana: must be auto, cpu, cuda or cuda:N"),
    (["trainer.on_nonfinite=maybe"], "trainer.on_nonfinite=maybe: must be one of [stop, skip]"),
    (["trainer.limit_val_batches=0"], "trainer.limit_val_batches=0"),
    (["numerics.forward_bits=1"], "numerics.forward_bits must be between 2 and 16, got 1"),
    (["numerics.rounding=banana"], "numerics.rounding='banana' is not one of"),
    (["numerics.optimizer=adam"], "numerics.optimizer='adam'"),
    (["numerics.integer_ops=[conv,fft]"], "fft"),
    (["task.lr=-1"], "task.lr=-1: must be a finite number >= 0"),
    (["task.lr=1e30"], "training step 2 (epoch 0) met a non-finite value: NaN or Inf in"),
    (["task.momentum=2"], "task.momentum=2"),
    (["task.schedule=linear"], "task.schedule=linear: must be one of"),
    (["task.model=resnet81"], "no model 'resnet81'"),
    (["dataset.image_size=0"], "dataset.image_size=0"),
    (["dataset=cifar10"], "dataset.root is required"),
    (["dataset=imagenet", "dataset.root=."], "train"),
    (["logger=wandb", "logger.mode=sometimes"], "logger.mode=sometimes: must be one of"),
    (["trainer.foo=1"], "Could not override 'trainer.foo'"),
    (["task=resnet19"], "Available options in 'task': deeplabv3, deit_small"),
    (["trainer.batch_size=[1"], "trainer.batch_size=[1:"),
]


def tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


@pytest.mark.parametrize("overrides,message", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, overrides, message):
    runs = tmp_path / "runs"
    (runs / "earlier").mkdir(parents=True)
    before = tree(runs)
    result = train_subprocess(tmp_path, *TINY, *SMALL_RESNET, "trainer.max_steps=2", f"runs_dir={runs}", *overrides)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], output
    assert tree(runs) == before, output
