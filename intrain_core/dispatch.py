"""Routes the torch functions a model calls to the integer ops, and logs every other op.

``IntegerMode`` is a ``TorchFunctionMode``: active only while a converted model runs its
forward, so nothing global is patched and model code stays untouched. Each handler returns
``FALLBACK`` when it cannot run an op in integers (an unsupported geometry, a family the
numerics leaves in float, a non-float32 dtype); the op then runs in float and is logged as such.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .ops import add as add_ops
from .ops import conv as conv_ops
from .ops import linear as linear_ops
from .ops import matmul as matmul_ops
from .ops import norm as norm_ops
from .ops import pool as pool_ops
from .ops import sync_norm as sync_norm_ops

FALLBACK = object()

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


def _is_float32(*tensors) -> bool:
    return all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in tensors)


def _linear(ctx, input, weight, bias=None):
    if not ctx.numerics.runs_integer("linear") or not _is_float32(input, weight):
        return FALLBACK
    return linear_ops.linear(ctx, input, weight, bias)


def _conv(op):
    def handler(ctx, input, weight, bias=None, *args, **kwargs):
        if not ctx.numerics.runs_integer("conv") or not _is_float32(input, weight):
            return FALLBACK
        y = op(ctx, input, weight, bias, *args, **kwargs)
        return FALLBACK if y is None else y

    return handler


def _matmul(op_name):
    def handler(ctx, input, other, *args, **kwargs):
        if args or kwargs or not ctx.numerics.runs_integer("matmul") or not _is_float32(input, other):
            return FALLBACK
        if input.dim() < 2 or other.dim() < 2:
            return FALLBACK
        return matmul_ops.matmul(ctx, input, other, op=op_name)

    return handler


def _rmatmul(ctx, input, other):
    return _matmul("matmul")(ctx, other, input)


def _is_network_value(ctx, *tensors) -> bool:
    """Adds inside a layer, or on parameters or tensors carrying gradients, are the network's own
    (residuals, position embeddings). What the root module computes itself on constants (a
    detector's anchor grids, box encoding and decoding, target assignment) is bookkeeping: in int8
    a shared scale would round box coordinates to whole pixels (to 16 pixels at COCO sizes)."""
    return (len(ctx.layer_stack) > 1 or
            any(isinstance(t, torch.Tensor) and (t.requires_grad or isinstance(t, torch.nn.Parameter))
                for t in tensors))


def _add(ctx, input, other, *args, alpha=1, out=None):
    if args or out is not None or alpha != 1 or not ctx.numerics.runs_integer("add"):
        return FALLBACK
    if not _is_float32(input, other) or not _is_network_value(ctx, input, other):
        return FALLBACK
    try:
        torch.broadcast_shapes(input.shape, other.shape)
    except RuntimeError:
        return FALLBACK  # let torch raise its own error
    return add_ops.add(ctx, input, other)


def _add_inplace(ctx, input, other, *args, **kwargs):
    """``a += b`` and ``a.add_(b)``: the integer sum written back into ``a``, as in place."""
    result = _add(ctx, input, other, *args, **kwargs)
    if result is FALLBACK or result.shape != input.shape:
        return FALLBACK
    return input.copy_(result)


def _scaled_dot_product_attention(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Attention with both matmuls in integers; the softmax stays float (section 7)."""
    if enable_gqa or not ctx.numerics.runs_integer("matmul") or not _is_float32(query, key, value):
        return FALLBACK
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = matmul_ops.matmul(ctx, query, key.transpose(-2, -1), op="attention_scores") * scale
    ctx.record("mul", "forward", False, 0)
    if is_causal:
        length, source = scores.shape[-2:]
        causal = torch.ones(length, source, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
            ctx.record("add (mask)", "forward", False, 0)
    weights = torch.softmax(scores, dim=-1)
    ctx.record("softmax", "forward", False, 0)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    return matmul_ops.matmul(ctx, weights, value, op="attention_values")


def _norm(name):
    def handler(ctx, *args, **kwargs):
        if not ctx.numerics.runs_integer("norm") or not _is_float32(args[0]):
            return FALLBACK
        y = getattr(norm_ops, name)(ctx, *args, **kwargs)
        return FALLBACK if y is None else y

    return handler


def _sync_batch_norm(ctx, input, *args):
    if not ctx.numerics.runs_integer("norm") or not _is_float32(input):
        return FALLBACK
    y = sync_norm_ops.integer_sync_batch_norm(ctx, input, *args)
    return FALLBACK if y is None else y


def _avg_pool2d(ctx, input, *args, **kwargs):
    if not ctx.numerics.runs_integer("pool") or not _is_float32(input):
        return FALLBACK
    y = pool_ops.avg_pool2d(ctx, input, *args, **kwargs)
    return FALLBACK if y is None else y


def _adaptive_avg_pool2d(ctx, input, output_size):
    if not ctx.numerics.runs_integer("pool") or not _is_float32(input):
        return FALLBACK
    y = pool_ops.adaptive_avg_pool2d(ctx, input, output_size)
    return FALLBACK if y is None else y


def _mean(ctx, input, dim=None, keepdim=False, *, dtype=None):
    if dim is None or dtype is not None or not ctx.numerics.runs_integer("pool") or not _is_float32(input):
        return FALLBACK
    return pool_ops.mean(ctx, input, dim, keepdim)


HANDLERS = {
    F.linear: _linear,
    F.conv1d: _conv(conv_ops.conv1d),
    F.conv2d: _conv(conv_ops.conv2d),
    F.conv_transpose2d: _conv(conv_ops.conv_transpose2d),
    torch.matmul: _matmul("matmul"),
    torch.Tensor.matmul: _matmul("matmul"),
    torch.Tensor.__matmul__: _matmul("matmul"),
    torch.Tensor.__rmatmul__: _rmatmul,
    torch.bmm: _matmul("bmm"),
    torch.Tensor.bmm: _matmul("bmm"),
    torch.mm: _matmul("mm"),
    torch.Tensor.mm: _matmul("mm"),
    F.scaled_dot_product_attention: _scaled_dot_product_attention,
    torch.add: _add,
    torch.Tensor.add: _add,
    torch.Tensor.__add__: _add,
    torch.Tensor.__radd__: _add,
    torch.Tensor.__iadd__: _add_inplace,
    torch.Tensor.add_: _add_inplace,
    F.batch_norm: _norm("batch_norm"),
    F.layer_norm: _norm("layer_norm"),
    F.group_norm: _norm("group_norm"),
    sync_norm_ops.sync_batch_norm: _sync_batch_norm,
    F.avg_pool2d: _avg_pool2d,
    F.adaptive_avg_pool2d: _adaptive_avg_pool2d,
    torch.mean: _mean,
    torch.Tensor.mean: _mean,
}


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
    """Runs the model's arithmetic through the integer ops of ``ctx``; logs the rest."""

    def __init__(self, ctx):
        super().__init__()
        self.ctx = ctx

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = HANDLERS.get(func)
        if handler is not None and self.ctx.numerics.integer:
            out = handler(self.ctx, *args, **kwargs)
            if out is not FALLBACK:
                return out
        result = func(*args, **kwargs)
        self._log(func, args, kwargs, result)
        return result

    def _log(self, func, args, kwargs, result) -> None:
        name = _canonical_name(getattr(func, "__name__", None) or str(func))
        if name in SELECTION:
            if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
                self.ctx.record(name, "forward", "exact")
            return
        if name in RESAMPLING and isinstance(result, torch.Tensor) and result.is_floating_point():
            mode = kwargs.get("mode", args[3] if name == "interpolate" and len(args) > 3 else "bilinear")
            if mode == "nearest":
                self.ctx.record(name, "forward", "exact")
                return
            # Linear resampling: one product per neighbour (2 per dimension) and output element.
            macs = result.numel() * 2 ** max(1, result.dim() - 2)
            self.ctx.record(name, "forward", False, macs)
            if result.requires_grad:
                self.ctx.record(name, "backward", False, macs)
            return
        if name in DATA_MOVEMENT or not isinstance(result, torch.Tensor) or not result.is_floating_point():
            return
        if name in EXACT:
            self.ctx.record(name, "forward", "exact")
            return
        macs = _float_macs(name, args, result)
        self.ctx.record(name, "forward", False, macs)
        if result.requires_grad:
            # The backward of a float op runs in float: about two products per forward one.
            self.ctx.record(name, "backward", False, 2 * macs)
