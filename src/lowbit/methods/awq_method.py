"""``+awq``: activation-aware input-channel scales folded into the op before each group of layers
(``lowbit.methods.awq`` computes and folds them, block by block)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..planning.config import AWQ_ATTRIBUTE
from .registry import BLOCK, Method, register

if TYPE_CHECKING:
    from torch import nn

    from ..planning.plan import QuantPlan


@register
class AWQ(Method):
    suffix = "+awq"
    needs = BLOCK  # the block's inputs: mean |x| and each group's Hessian, and its outputs to check the fold

    @classmethod
    def consumer(cls, model: nn.Module, plan: QuantPlan, layers: frozenset[str]):
        from .awq import AWQScales

        return AWQScales(model, plan, layers)

    @classmethod
    def unmet(cls, model, name: str) -> str | None:
        if name in getattr(model, AWQ_ATTRIBUTE, {}):
            return None
        return (f"{name} is to be quantized with +awq, whose scales come from the whole model's calibration pass: "
                "run lowbit.workflows.run.run(model, plan, calibration) (or lowbit.methods.calibrated."
                "calibrate_methods) first")
