"""Train a finished segmentation run again from step 0 to ``STEPS`` with the same config, and log
per parameter and step: gradient, weight and update norms, and the integer context's counters;
per batch-norm layer and step: values per channel, the share of channels whose batch spread is
below one 8-bit step of the layer's input, and the gain max|dL/dx| / max|dL/dy| of its backward.
The trace only reads tensors, so it draws nothing from the rounding streams: an int8 retrace
repeats the run bit for bit (checked against the run's metrics.csv at the end).

    python scripts/diagnostics/trace_steps.py RUN_DIR OUT_DIR [--steps 260]

Works on detection and segmentation runs (any run with an ``mm_config.py``).
"""
import argparse
import csv
import importlib
import sys
from pathlib import Path

import numpy as np
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import Runner

import tasks.openmmlab_hooks  # noqa: F401  (registers IntSGD and the hooks)
from intrain_core import context_of

BN_FIELDS = ["step", "layer", "values_per_channel", "channels_below_one_step", "backward_gain"]
FIELDS = ["step", "param", "grad_norm", "grad_absmax", "weight_norm", "update_norm"]


@HOOKS.register_module(force=True)
class StepTraceHook(Hook):
    priority = "LOW"  # after IntegerNumericsHook has converted the model

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.files = []

    def _csv(self, name: str, header: list[str]):
        self.files.append(open(self.out_dir / name, "w", newline=""))
        writer = csv.writer(self.files[-1])
        writer.writerow(header)
        return writer

    def before_train(self, runner) -> None:
        model = getattr(runner.model, "module", runner.model)
        names = {p: n for n, p in model.named_parameters()}
        optimizer = runner.optim_wrapper.optimizer
        ctx = context_of(model)
        rows = self._csv("params.csv", FIELDS)
        counters = self._csv("counters.csv", ["step", "clamps", "widenings", "nonfinite"])
        original_step = optimizer.step

        def traced_step(*args, **kwargs):
            step = runner.iter + 1
            before = {p: (p.detach().clone(), p.grad.detach().clone()) for p in names if p.grad is not None}
            result = original_step(*args, **kwargs)
            for p, (w0, g) in before.items():
                rows.writerow([step, names[p], f"{g.norm():.6g}", f"{g.abs().max():.6g}",
                               f"{p.detach().norm():.6g}", f"{(p.detach() - w0).norm():.6g}"])
            if ctx is not None:
                counters.writerow([step] + [ctx.counters.get(k, 0) for k in ("clamps", "widenings", "nonfinite")])
            return result

        optimizer.step = traced_step
        bn_rows = self._csv("bn.csv", BN_FIELDS)
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.register_forward_hook(self._bn_probe(runner, name, bn_rows))

    def after_run(self, runner) -> None:
        for f in self.files:
            f.close()

    @staticmethod
    def _bn_probe(runner, name, bn_rows):
        """Reads the layer's input and the two gradients; changes nothing."""
        def probe(module, inputs, output):
            x = inputs[0]
            if not (module.training and torch.is_grad_enabled() and x.requires_grad):
                return
            # numpy: a torch op here would run inside intrain's IntegerMode and draw rounding noise
            grouped = np.swapaxes(x.detach().numpy(), 0, 1).reshape(x.shape[1], -1)
            step_8bit = 2.0 ** (np.floor(np.log2(np.abs(grouped).max())) - 6)  # docs/numerics-contract.md section 1
            below = float(((grouped.max(1) - grouped.min(1)) < step_8bit).mean())
            seen = {}
            output.register_hook(lambda g: seen.__setitem__("dy", float(g.abs().max())))

            def on_input_grad(g):
                gain = float(g.abs().max()) / max(seen.get("dy", 0.0), 1e-30)
                bn_rows.writerow([runner.iter + 1, name, grouped.shape[1], f"{below:.4f}", f"{gain:.4g}"])

            x.register_hook(on_input_grad)
        return probe


def losses(path: Path) -> dict[int, str]:
    with open(path) as f:
        return {int(r["step"]): r["train/loss"] for r in csv.DictReader(f) if r["train/loss"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_dir", type=Path, help="a new (or empty) folder for the trace")
    parser.add_argument("--steps", type=int, default=260)
    args = parser.parse_args(argv)
    run_dir, out_dir = args.run_dir, args.out_dir
    if out_dir.exists() and any(out_dir.iterdir()):
        # The coverage step is skipped when its report already exists: a reused folder could retrace differently.
        print(f"{out_dir} is not empty: give a new folder", file=sys.stderr)
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = Config.fromfile(run_dir / "mm_config.py")
    for module in cfg.get("custom_imports", {}).get("imports", []):
        importlib.import_module(module)
    cfg.work_dir = str(out_dir)
    cfg.train_cfg.max_iters = args.steps
    for hook in cfg.custom_hooks:
        hook["run_dir"] = str(out_dir)
        hook.pop("wandb", None)
    cfg.custom_hooks.append(dict(type="StepTraceHook", out_dir=str(out_dir)))
    Runner.from_cfg(cfg).train()

    # The retrace must be the run itself: compare the training losses step by step.
    original, retrace = losses(run_dir / "metrics.csv"), losses(out_dir / "metrics.csv")
    differ = [s for s in retrace if original.get(s) != retrace[s]]
    print(f"retrace of {run_dir}: {len(retrace)} steps, {len(differ)} with a loss that differs from the run's"
          + (f" (first: step {differ[0]})" if differ else ""))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
