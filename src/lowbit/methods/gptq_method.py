"""``+gptq``: each layer's weight rounded column by column against its inputs' Hessian (``lowbit.methods.gptq``),
block by block on what the quantized blocks before it produce (``lowbit.methods.gptq_model``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import InputError
from ..formats.registry import GridCodec, codec_for, get_format
from .registry import HESSIAN, Method, register

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..planning.config import QuantConfig
    from ..planning.plan import QuantPlan


@register
class GPTQ(Method):
    suffix = "+gptq"
    needs = HESSIAN
    prequantizes = True

    @classmethod
    def consumer(cls, model: nn.Module, plan: QuantPlan, layers: frozenset[str]):
        from .gptq_model import GPTQWeights

        return GPTQWeights(model, plan, layers)

    @classmethod
    def quantize_layer(cls, name: str, weight: torch.Tensor, hessian: torch.Tensor, config: QuantConfig):
        from .gptq_model import gptq_layer

        return gptq_layer(name, weight, hessian, config).qweight

    @classmethod
    def check(cls, config: QuantConfig) -> None:
        spec = get_format(config.format)
        if not issubclass(codec_for(spec), GridCodec):
            raise InputError(f"GPTQ needs a format whose elements are levels on a grid; {spec.name} is a GGUF block "
                             "format: try int4, int4_asym, nf4 or fp4_e2m1")
