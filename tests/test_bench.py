"""The benchmark's live-tensor peak: what one step holds at once, not what it allocates in all."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from bench import _live_peak_bytes  # noqa: E402

MIB = 1 << 20
ELEMENTS = MIB // 4  # one MiB of float32


def test_live_peak_counts_tensors_held_together():
    def together():
        held = [torch.ones(ELEMENTS) for _ in range(3)]
        return sum(t[0] for t in held)

    def one_at_a_time():
        for _ in range(3):
            torch.ones(ELEMENTS).sum()

    # Each step allocates 3 MiB in all; small scalars and the profiler's own bookkeeping add
    # well under one MiB.
    assert 3 * MIB <= _live_peak_bytes(together) < 4 * MIB
    assert MIB <= _live_peak_bytes(one_at_a_time) < 2 * MIB
