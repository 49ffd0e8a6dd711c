"""Integer ``F.scaled_dot_product_attention``: both matmuls in integers, the softmax in float
(docs/numerics-contract.md sections 3 and 7)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..registry import FALLBACK, implements, is_float32
from .matmul import matmul


@implements(F.scaled_dot_product_attention)
def scaled_dot_product_attention_handler(context, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                         scale=None, enable_gqa=False):
    if enable_gqa or not context.numerics.runs_integer("matmul") or not is_float32(query, key, value):
        return FALLBACK
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    fraction, exponent = math.frexp(scale)
    if fraction == 0.5:  # a power of two (head dimension 4**k): the product's exponent takes it
        scores = matmul(context, query, key.transpose(-2, -1), op="attention_scores", scale_exponent=exponent - 1)
    else:
        scores = matmul(context, query, key.transpose(-2, -1), op="attention_scores") * scale
        context.record("mul", "forward", False, 0)
    if is_causal:
        length, source = scores.shape[-2:]
        causal = torch.ones(length, source, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
            context.record("add (mask)", "forward", False, 0)
    weights = torch.softmax(scores, dim=-1)
    context.record("softmax", "forward", False, 0)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    return matmul(context, weights, value, op="attention_values")
