"""LLM.int8() (Dettmers et al., arXiv 2208.07339): int8 weights with one absmax per row, and at run time the
input columns holding an outlier (|x| >= threshold in any token) multiplied in float. Its label is a whole one,
``int8_outlier[/THRESHOLD]`` (``lowbit.planning.config``), not a suffix; the layer that computes it is
``lowbit.layers.outlier_linear.Int8OutlierLinear``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..planning.config import OUTLIER_FORMAT
from .registry import NOTHING, Method, register

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..layers.linear import QuantLinear
    from ..planning.config import QuantConfig
    from ..tensor import QuantizedTensor


@register
class LLMInt8(Method):
    suffix = OUTLIER_FORMAT
    needs = NOTHING  # the outliers are found in each call's own input
    row_blocks = True  # the paper's vector-wise quantization: one scale per output row
    rounds_activations = True

    @classmethod
    def make_layer(cls, name: str, linear: nn.Linear, qweight: QuantizedTensor, signs: torch.Tensor | None,
                   config: QuantConfig) -> QuantLinear:
        from ..layers.outlier_linear import Int8OutlierLinear

        return Int8OutlierLinear.from_linear(linear, qweight, threshold=config.outlier_threshold, name=name)
