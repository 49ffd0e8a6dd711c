"""The record of kernels compiled by earlier processes: a process compiles those at their first
call, and only those; the record merges writers and survives a damaged or read-only file."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from intrain_core import kernel_record

ROOT = Path(__file__).resolve().parent.parent

# One process maps a tensor with the given rounding modes under the given compilation mode and
# prints, per rounding, whether its kernel was compiled and its eager seconds.
SCRIPT = """
import json, sys
import torch
from intrain_core import compiled
from intrain_core.fixed_point import map_kernel
from intrain_core.rounding import as_key

x = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
report = {}
with compiled.compilation(sys.argv[1]):
    for rounding in sys.argv[2:]:
        map_kernel(x, 8, rounding, as_key(3))
        entry = map_kernel.kernels[((True, None), (False, 8), (False, rounding), (True, None))]
        report[rounding] = [entry.compiled is not None, entry.eager_seconds]
print(json.dumps(report))
"""


def _run(cache: Path, mode: str, *roundings: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode, *roundings], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_kernel_compiled_by_an_earlier_process_is_compiled_at_its_first_call(tmp_path):
    first = _run(tmp_path, "always", "stochastic")
    assert first["stochastic"] == [True, 0.0]
    assert len(json.loads((tmp_path / kernel_record.FILE_NAME).read_text())) == 1
    later = _run(tmp_path, "auto", "stochastic", "nearest")
    assert later["stochastic"] == [True, 0.0]  # from the record, without an eager call
    compiled, eager_seconds = later["nearest"]  # never compiled before: eager until it pays
    assert not compiled and eager_seconds > 0


def _isolated(monkeypatch, directory: Path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(directory))
    monkeypatch.setattr(kernel_record, "_records", {})


def test_the_record_merges_what_another_process_wrote(tmp_path, monkeypatch):
    _isolated(monkeypatch, tmp_path)
    assert not kernel_record.known("mine")
    (tmp_path / kernel_record.FILE_NAME).write_text(json.dumps(["theirs"]))
    kernel_record.remember("mine")
    assert set(json.loads((tmp_path / kernel_record.FILE_NAME).read_text())) == {"mine", "theirs"}
    assert kernel_record.known("mine") and kernel_record.known("theirs")
    assert not [p for p in tmp_path.iterdir() if p.name != kernel_record.FILE_NAME]  # no temporary left


@pytest.mark.parametrize("content", ["{not json", json.dumps({"a": 1}), json.dumps([1, 2])])
def test_a_damaged_record_counts_as_empty_and_is_rewritten(tmp_path, monkeypatch, content):
    _isolated(monkeypatch, tmp_path)
    (tmp_path / kernel_record.FILE_NAME).write_text(content)
    assert not kernel_record.known("a")
    kernel_record.remember("a")
    assert json.loads((tmp_path / kernel_record.FILE_NAME).read_text()) == ["a"]


def test_a_cache_that_cannot_be_written_leaves_the_record_as_it_is(tmp_path, monkeypatch):
    """A cache directory below a regular file: neither created nor written, and no error."""
    blocker = tmp_path / "a file"
    blocker.write_text("")
    _isolated(monkeypatch, blocker / "cache")
    kernel_record.remember("a")
    assert [p.name for p in tmp_path.iterdir()] == ["a file"]


def test_a_signature_changes_with_the_options_the_inputs_and_the_code(monkeypatch):
    import torch

    def kernel(x):
        return x

    options = ((True, None), (False, 8))
    base = kernel_record.signature(kernel, options, kernel_record.layout([torch.zeros(2, 3)]))
    assert base == kernel_record.signature(kernel, options, kernel_record.layout([torch.ones(5, 7)]))
    assert base != kernel_record.signature(kernel, ((True, None), (False, 16)), kernel_record.layout([torch.zeros(2, 3)]))
    assert base != kernel_record.signature(kernel, options, kernel_record.layout([torch.zeros(2, 3, dtype=torch.int8)]))
    assert base != kernel_record.signature(kernel, options, kernel_record.layout([torch.zeros(6)]))
    monkeypatch.setattr(kernel_record, "_code_version", "another version of intrain")
    assert base != kernel_record.signature(kernel, options, kernel_record.layout([torch.zeros(2, 3)]))
