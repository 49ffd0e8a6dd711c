"""The integer norm's statistics compiled as AVX2 code give the eager integers.

Inductor writes vector code for the CPU's instruction set; an AVX2-only CPU gets 256-bit code,
which this suite would otherwise never compile on an AVX-512 machine. torch 2.14.1's AVX2 code
selected the wrong branch of a ``torch.where`` on an int64 comparison, which made every batch
norm's reciprocal square root wrong (docs/findings.md). Run in a subprocess with
``ATEN_CPU_CAPABILITY=avx2`` and an inductor cache of its own (kernels cached for one vector
width must not reach a process using another)."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import torch
from intrain_core.ops import norm
from intrain_core.compiled import compilation
torch.manual_seed(0)
# 45-bit variances: reciprocal_sqrt scales them up by 4**8 before the integer square root.
v = torch.randint(2**44, 2**45, (1, 64, 1), dtype=torch.int64)
compiled = torch.compile(norm.reciprocal_sqrt, fullgraph=True, dynamic=True)
got, want = compiled(v), norm.reciprocal_sqrt(v)
assert all(torch.equal(a, b) for a, b in zip(got, want)), (got[0].flatten()[:2], want[0].flatten()[:2])
m = torch.randint(-127, 128, (8, 16, 64), dtype=torch.int8)
with compilation(True):
    got = norm._batch_statistics(m, torch.tensor(-5), 10995116, -8)
want = norm._batch_statistics.eager(m, torch.tensor(-5), 10995116, -8)
assert all(torch.equal(a, b) for a, b in zip(got, want))
print(torch.backends.cpu.get_cpu_capability())
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="AVX2 is an x86 instruction set")
def test_norm_statistics_compiled_for_avx2_match_eager(tmp_path):
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
           "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "AVX2"
