"""``+awq``: activation-aware input-channel scales folded into the op before each group of layers
(``lowbit.methods.awq`` computes and folds them, block by block)."""

from __future__ import annotations

from .registry import BLOCK, Method, register


@register
class AWQ(Method):
    suffix = "+awq"
    needs = BLOCK  # the block's inputs: mean |x| and each group's Hessian, and its outputs to check the fold
