"""Integer SyncBatchNorm: batch statistics shared between ranks as exact integer sums.

Under DDP a ``SyncBatchNorm`` layer normalises with the statistics of the global batch. Here N
ranks compute what one process computes on the concatenated batch, with the kernels of norm.py:
- forward: the ranks agree on the input's exponent (one MAX all-reduce), each maps its input
  onto it, and one SUM all-reduce adds the per-channel S1 and S2 (int64) and the counts;
  statistics, output and running statistics then follow from the global sums;
- backward: the same for the incoming gradient's exponent; one SUM all-reduce adds the
  per-channel sums of d and d xhat, and one MAX all-reduce agrees on the shift that narrows the
  result, as the one process narrows by its largest value.
With nearest rounding this is the 1-process integer batch norm of the concatenated batch bit for
bit. Stochastic mappings of the input and the gradient draw with ``rank_key`` (seed, counter,
rank); gamma and beta, the same on every rank, are mapped with the shared key as in norm.py.
The affine gradients stay local sums, as in PyTorch's SyncBatchNorm: DDP's all-reduce adds them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import handle_torch_function, has_torch_function

from ..collective import agree_exponents, rank_key
from ..compiled import fused
from ..fixed_point import bit_length, fixed_constant, from_fixed, map_at_deferred, mantissa_dtype, qmax
from ..registry import FALLBACK, implements, is_float32
from ..rounding import round_half_up_shift
from . import norm
from .weights import map_weight

OP = "sync_batch_norm"
_sums = fused(norm.group_sums)
_statistics_from_sums = fused(norm.statistics_from_sums)
_backward_sums = fused(norm.backward_sums)
_backward_inner = fused(norm.backward_inner)
_backward_input = fused(norm.backward_input)


def _map_shared(context, x, bits: int, group, where: str):
    """x mapped onto the exponent all ranks agree on; the mantissas and that exponent."""
    exponent, finite = agree_exponents([x], bits, group)
    exponent = exponent[0]
    fp, _ = map_at_deferred(x, exponent, qmax(bits), context.numerics.rounding, rank_key(context.key(), dist.get_rank(group)))
    context.nonfinite.note(finite, where)  # every rank stops when one met NaN or Inf
    context.count("clamps", fp.clamped)
    return fp.mantissa.to(mantissa_dtype(bits)), exponent, finite


def _narrow_shared(v, group):
    """``norm.narrow`` by the largest shift any rank needs: what one process would shift by."""
    shift = (bit_length(v.abs().amax()) - norm.OPERAND_BITS).clamp(min=0).reshape(1)
    dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
    return round_half_up_shift(v, shift[0]), shift[0]


class IntegerSyncNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, context, layer, eps, running, momentum, group):
        bits = context.numerics.forward_bits
        m, x_exp, finite = _map_shared(context, x, bits, group, context.where(OP, "input", layer))
        m = m.reshape(x.shape[0], x.shape[1], -1)
        exponent = torch.full_like(x_exp, -norm.FRACTION_BITS)
        gamma = beta = None
        affine = (1, -1) + (1,) * (x.dim() - 2)
        if weight is not None:
            gamma = map_weight(context, weight, context.where(OP, "weight", layer))
            exponent = exponent + gamma.exponent
        if bias is not None:
            beta = context.map_at(bias, exponent, 2**62, context.where(OP, "bias", layer))
        s1, s2 = _sums(m)
        channels = s1.numel()
        # S1, S2 and the count: |S2| <= n qmax**2, int64 for any batch int64 can index.
        packed = torch.cat([s1.flatten(), s2.flatten(), torch.tensor([m.shape[0] * m.shape[2]], device=x.device)])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        s1, s2 = packed[:channels].view(s1.shape), packed[channels:2 * channels].view(s2.shape)
        count = int(packed[-1])  # the global batch's size: constants of the kernels below
        eps_m, eps_e = fixed_constant(eps * count * count, norm.EPS_BITS) if eps > 0 else (0, 0)
        variance, inv, inv_exp = _statistics_from_sums(s1, s2, count, x_exp, eps_m, eps_e)
        c_shift = norm.centred_shift(count, bits)
        y = norm.forward_training(m, s1, inv, inv_exp, count, c_shift,
                                   gamma.mantissa.reshape(affine) if gamma is not None else None,
                                   beta.mantissa.reshape(affine) if beta is not None else None, exponent, x.shape,
                                   per_channel=True)
        if running is not None:
            norm.update_running(context, running, momentum, s1.flatten(), variance.flatten(), count, x_exp, finite)
        ctx.context, ctx.layer, ctx.group, ctx.count, ctx.c_shift = context, layer, group, count, c_shift
        ctx.has = (weight is not None, bias is not None)
        ctx.save_for_backward(m, x_exp, s1, inv, inv_exp, gamma.mantissa if gamma is not None else None,
                               gamma.exponent if gamma is not None else None)
        context.record(OP, "forward", True, 2 * x.numel(), layer)
        return y

    @staticmethod
    def backward(ctx, grad):
        context, layer, group, count = ctx.context, ctx.layer, ctx.group, ctx.count
        m, x_exp, s1, inv, inv_exp, gamma_m, gamma_exp = ctx.saved_tensors
        g, g_exp, _ = _map_shared(context, grad, context.numerics.backward_bits, group, context.where(OP, "grad_output", layer))
        has_weight, has_bias = ctx.has
        affine = (1, -1) + (1,) * (grad.dim() - 2)
        gamma_aff = gamma_m.reshape(affine) if has_weight else None
        gamma_exp = gamma_exp if has_weight else torch.zeros_like(x_exp)
        dims = (0,) + tuple(range(2, grad.dim()))
        xhat, grad_w, grad_b, d, total, projection = _backward_sums(m, s1, inv, inv_exp, g, gamma_aff, count,
                                                                    ctx.c_shift, dims)
        channels = total.numel()
        # |sum d| <= n qmax**2 and |sum d xhat| <= n qmax**2 2**(16 + 16) (norm.py): int64.
        packed = torch.cat([total.flatten(), projection.flatten()])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        total, projection = packed[:channels].view(total.shape), packed[channels:].view(projection.shape)
        inner, inner_shift = _narrow_shared(_backward_inner(xhat, d, total, projection, count), group)
        grad_x = _backward_input(inner, inner_shift, inv, inv_exp, count, count.bit_length(), x_exp, g_exp, gamma_exp)
        grad_weight = from_fixed(grad_w, g_exp - norm.FRACTION_BITS) if has_weight else None
        grad_bias = from_fixed(grad_b, g_exp) if has_bias else None
        context.record(OP, "backward", True, 4 * grad.numel(), layer)
        return grad_x.reshape(grad.shape), grad_weight, grad_bias, None, None, None, None, None, None


def sync_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps, group, world_size):
    """The synchronised training batch norm: integer inside a converted model's forward (the
    dispatch routes this function to ``integer_sync_batch_norm``), PyTorch's own elsewhere."""
    args = (input, running_mean, running_var, weight, bias, momentum, eps, group, world_size)
    if has_torch_function((input,)):
        return handle_torch_function(sync_batch_norm, (input,), *args)
    from torch.nn.modules._functions import SyncBatchNorm as FloatSyncBatchNorm

    return FloatSyncBatchNorm.apply(input, weight, bias, running_mean, running_var, eps, momentum, group, world_size)


def integer_sync_batch_norm(context, input, running_mean, running_var, weight, bias, momentum, eps, group, world_size,
                            layer=None):
    """``sync_batch_norm`` in integers; None where norm.py would not run it in integers."""
    if context.numerics.backward == "float" or input.dim() < 2:
        return None  # the int8_fwd ablation's float backward has no CPU SyncBatchNorm to borrow
    running = (running_mean, running_var) if running_mean is not None else None
    return IntegerSyncNorm.apply(input, weight, bias, context, layer or context.layer, eps, running, momentum, group)


def forward(module: torch.nn.SyncBatchNorm, input: torch.Tensor) -> torch.Tensor:
    """``SyncBatchNorm.forward`` for a converted model: the same decisions as PyTorch's (running
    statistics, momentum, when to synchronise), without its refusal of CPU tensors, and the
    synchronised case through ``sync_batch_norm``."""
    module._check_input_dim(input)
    module._check_non_zero_input_channels(input)
    factor = 0.0 if module.momentum is None else module.momentum
    if module.training and module.track_running_stats:
        module.num_batches_tracked.add_(1)
        factor = 1.0 / float(module.num_batches_tracked) if module.momentum is None else module.momentum
    bn_training = module.training or (module.running_mean is None and module.running_var is None)
    tracked = not module.training or module.track_running_stats
    running_mean = module.running_mean if tracked else None
    running_var = module.running_var if tracked else None
    group = module.process_group or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
    world_size = dist.get_world_size(group) if group is not None else 1
    if not (bn_training and module.training and world_size > 1):
        return F.batch_norm(input, running_mean, running_var, module.weight, module.bias, bn_training, factor,
                            module.eps)
    return sync_batch_norm(input, running_mean, running_var, module.weight, module.bias, factor, module.eps, group,
                           world_size)


@implements(sync_batch_norm)
def sync_batch_norm_handler(context, input, *args):
    if not context.numerics.runs_integer("norm") or not is_float32(input):
        return FALLBACK
    y = integer_sync_batch_norm(context, input, *args)
    return FALLBACK if y is None else y
