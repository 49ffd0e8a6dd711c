"""Without OpenMMLab (a separate `make install-openmmlab`), a detection or segmentation run refuses
in one line that names the command, before anything is written."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT

# Runs train.py as `python train.py ...` would, with OpenMMLab's packages unimportable: a None
# entry in sys.modules makes every import of that name (and its submodules) fail.
WITHOUT_OPENMMLAB = """
import runpy, sys
for name in ("mmengine", "mmcv", "mmdet", "mmseg"):
    sys.modules[name] = None
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("task,dataset", [("faster_rcnn", "digits_det"), ("deeplabv3", "digits_seg")])
def test_detection_and_segmentation_without_openmmlab_name_the_install_command(tmp_path, task, dataset):
    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0",
           "INTRAIN_DATA_CACHE": str(tmp_path / "data")}
    result = subprocess.run([sys.executable, "-c", WITHOUT_OPENMMLAB, str(ROOT / "train.py"), f"task={task}",
                             f"dataset={dataset}", "trainer.max_steps=2", f"runs_dir={runs}"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if "make install-openmmlab" in line]
    assert len(lines) == 1 and f"task={task}" in lines[0], output
    assert not runs.exists(), sorted(runs.rglob("*"))
    assert not (tmp_path / "data").exists()  # the embedded data is not generated either
