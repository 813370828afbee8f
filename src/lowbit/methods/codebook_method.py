"""``+cb``: a learned codebook refit to the layer's output error between GPTQ rounds
(``lowbit.methods.codebook_refit``); it runs inside GPTQ, on GPTQ's Hessian."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import InputError
from ..formats.registry import codec_for, get_format
from .gptq_method import GPTQ
from .registry import HESSIAN, Method, register

if TYPE_CHECKING:
    import torch

    from ..planning.config import QuantConfig

SUFFIX = "+cb"


@register
class CodebookRefit(Method):
    suffix = SUFFIX
    needs = HESSIAN

    @classmethod
    def check(cls, config: QuantConfig) -> None:
        if not GPTQ.uses(config):
            raise InputError(f"{SUFFIX} refits the codebook to the layer's output error on GPTQ's Hessian: add "
                             f"{GPTQ.suffix}, e.g. lloyd4/32+dq{GPTQ.suffix}{SUFFIX}")
        spec = get_format(config.format)
        if codec_for(spec).family != "learned":
            raise InputError(f"{SUFFIX} refits a codebook stored with the tensor; {spec.name} has none: use a "
                             "learned codebook format, lloyd2..lloyd8 or qq2..qq8")

    @classmethod
    def refine(cls, config: QuantConfig, weight: torch.Tensor, hessian: torch.Tensor, result, requantize):
        from .codebook_refit import refit_rounds

        return refit_rounds(weight, hessian, result, requantize)
