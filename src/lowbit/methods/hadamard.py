"""``+had``: a randomized Hadamard rotation of each layer's input dimension before rounding (the math, which
``QuantLinear.forward`` needs too, is ``lowbit.layers.rotation``'s)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import InputError
from .gptq_method import GPTQ
from .registry import NOTHING, Method, register

if TYPE_CHECKING:
    import torch

    from ..planning.config import QuantConfig


@register
class Hadamard(Method):
    suffix = "+had"
    needs = NOTHING  # the weight is rotated on its own; with +gptq the Hessian is rotated with it

    @classmethod
    def check(cls, config: QuantConfig) -> None:
        from ..pipeline import needs_calibration

        if needs_calibration(config.search) and not GPTQ.uses(config):
            raise InputError(f"+had with @{config.search} needs +gptq: the rotated inputs' importance is the "
                             "diagonal of the rotated Hessian, which GPTQ collects")

    @classmethod
    def layer_signs(cls, name: str, in_features: int) -> torch.Tensor:
        from ..layers.rotation import layer_signs

        return layer_signs(name, in_features)

    @classmethod
    def prepare_weight(cls, name: str, weight: torch.Tensor) -> torch.Tensor:
        from ..layers.rotation import rotate

        return rotate(weight, cls.layer_signs(name, weight.shape[1]))
