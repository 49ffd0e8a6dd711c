"""Routes the torch functions a model calls to the integer ops, and logs every other op.

``IntegerMode`` is a ``TorchFunctionMode``: active only while a converted model runs its
forward, so nothing global is patched and model code stays untouched. The handlers live next
to their ops (``ops/*.py``, registered in ``registry.HANDLERS``); a call without one, or whose
handler returns ``FALLBACK``, runs in float and is logged as such.
"""
from __future__ import annotations

import math

import torch
from torch.overrides import TorchFunctionMode

# Each op file registers its handlers when imported.
from .ops import activation, add, attention, conv, linear, matmul, norm, pool, sync_norm  # noqa: F401
from .registry import FALLBACK, HANDLERS

# Ops that move or select data, or only read metadata: nothing to convert, nothing to report.
DATA_MOVEMENT = frozenset(
    """__get__ __getitem__ __setitem__ __len__ __format__ __repr__ __bool__ __index__ __int__ __float__ __eq__
    __ne__ __lt__ __le__ __gt__ __ge__ __and__ __or__ __invert__ __contains__ __hash__ __reduce_ex__ __deepcopy__
    __array__ __iter__
    size dim numel view view_as reshape reshape_as permute transpose t contiguous flatten unflatten unsqueeze
    squeeze expand expand_as repeat repeat_interleave cat concat concatenate stack split chunk unbind narrow
    select index_select gather masked_select flip roll clone detach detach_ to cpu cuda float double half
    bfloat16 long int bool type type_as new_zeros new_ones new_empty new_full new_tensor zeros_like ones_like
    empty_like full_like fill_ zero_ copy_ requires_grad_ is_floating_point is_contiguous data_ptr
    element_size stride storage_offset get_device tolist item nelement any all isfinite isnan isinf
    argmax argmin max min topk sort argsort eq ne lt le gt ge where masked_fill masked_fill_ pad
    pixel_shuffle pixel_unshuffle channel_shuffle interpolate upsample grid_sample dim_order
    unfold movedim moveaxis swapaxes squeeze_ unsqueeze_ tril triu identity dropout dropout1d dropout2d
    dropout_ alpha_dropout feature_alpha_dropout _has_compatible_shallow_copy_type""".split()
)
# Selection ops (detection heads, NMS inputs): no arithmetic, but named in the report.
SELECTION = frozenset("topk sort argsort argmax argmin max min".split())
# Resampling computes weighted averages of neighbours (float) unless it only copies (nearest).
RESAMPLING = frozenset("interpolate upsample grid_sample".split())
# No arithmetic, exact in any representation (docs/numerics-contract.md sections 6-7).
EXACT = frozenset("relu relu_ relu6 hardtanh hardtanh_ max_pool1d max_pool2d max_pool3d adaptive_max_pool2d "
                  "max_pool2d_with_indices adaptive_max_pool1d neg __neg__ abs leaky_relu leaky_relu_ clamp clip "
                  "clamp_ threshold".split())


def _float_macs(name: str, args, result) -> int:
    """Multiply-accumulates of a float op, for the ops that do many; 0 for elementwise ones."""
    if not isinstance(result, torch.Tensor):
        return 0
    if name in ("linear", "matmul", "__matmul__", "__rmatmul__", "bmm", "mm", "addmm", "baddbmm", "addbmm"):
        a = args[0] if name in ("linear", "matmul", "__matmul__", "bmm", "mm") else args[1]
        if name == "__rmatmul__":
            a = args[1]
        return result.numel() * a.shape[-1] if isinstance(a, torch.Tensor) and a.dim() else 0
    if name.startswith("conv") and len(args) > 1 and isinstance(args[1], torch.Tensor):
        w = args[1]
        per_output = math.prod(w.shape[1:]) if not name.startswith("conv_transpose") else math.prod(w.shape[2:]) * w.shape[0]
        return result.numel() * per_output
    if name == "scaled_dot_product_attention":
        q, k = args[0], args[1]
        return 2 * q.shape[:-1].numel() * k.shape[-2] * q.shape[-1]
    return 0


def _canonical_name(name: str) -> str:
    """``__iadd__``, ``__radd__``, ``add_`` and ``add`` are one op in the report."""
    if name.startswith("__") and name.endswith("__"):
        bare = name[2:-2]
        if bare[:1] in ("i", "r") and bare[1:] in ("add", "sub", "mul", "truediv", "matmul"):
            return bare[1:]
        return bare if bare in ("add", "sub", "mul", "truediv", "matmul") else name
    if name.endswith("_") and not name.startswith("_"):
        return name[:-1]
    return name


class IntegerMode(TorchFunctionMode):
    """Runs the model's arithmetic through the integer ops of ``context``; logs the rest."""

    def __init__(self, context):
        super().__init__()
        self.context = context

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = HANDLERS.get(func)
        if handler is not None and self.context.numerics.integer and self._allowed(func, args):
            out = handler(self.context, *args, **kwargs)
            if out is not FALLBACK:
                return out
        result = func(*args, **kwargs)
        self._log(func, args, kwargs, result)
        return result

    def _allowed(self, func, args) -> bool:
        op_filter = self.context.op_filter
        if op_filter is None:
            return True
        name = _canonical_name(getattr(func, "__name__", None) or str(func))
        return bool(op_filter(name, tuple(self.context.layer_stack), args))

    def _log(self, func, args, kwargs, result) -> None:
        name = _canonical_name(getattr(func, "__name__", None) or str(func))
        if name in SELECTION:
            if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
                self.context.record(name, "forward", "exact")
            return
        if name in RESAMPLING and isinstance(result, torch.Tensor) and result.is_floating_point():
            mode = kwargs.get("mode", args[3] if name == "interpolate" and len(args) > 3 else "bilinear")
            if mode == "nearest":
                self.context.record(name, "forward", "exact")
                return
            # Linear resampling: one product per neighbour (2 per dimension) and output element.
            macs = result.numel() * 2 ** max(1, result.dim() - 2)
            self.context.record(name, "forward", False, macs)
            if result.requires_grad:
                self.context.record(name, "backward", False, macs)
            return
        if name in DATA_MOVEMENT or not isinstance(result, torch.Tensor) or not result.is_floating_point():
            return
        if name in EXACT:
            self.context.record(name, "forward", "exact")
            return
        macs = _float_macs(name, args, result)
        self.context.record(name, "forward", False, macs)
        if result.requires_grad:
            # The backward of a float op runs in float: about two products per forward one.
            self.context.record(name, "backward", False, 2 * macs)
