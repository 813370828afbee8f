"""transformers' ``save_pretrained`` on a model holding QuantLinear layers would write none of
them (they are not parameters) and ``from_pretrained`` would initialise them at random: until
lowbit has an export format transformers reads, it refuses, through transformers' own hook."""

from __future__ import annotations

import functools
import sys

from torch import nn

from ..errors import LowbitError
from .linear import QuantLinear


class SavePretrainedError(LowbitError, ValueError):
    """transformers' ``save_pretrained`` was called on a model holding QuantLinear layers."""


SAVE_PRETRAINED_REFUSED = (
    "this model holds lowbit QuantLinear layers, which transformers' save_pretrained cannot save (it would write "
    "none of them, and from_pretrained would then initialise them at random); use lowbit.io.save_quantized(...) "
    "or `lowbit quantize`"
)


def refuse_save_pretrained(model: nn.Module) -> None:
    """Make transformers' ``save_pretrained`` raise ``SavePretrainedError`` on ``model``.

    ``PreTrainedModel.save_pretrained`` asks ``model.hf_quantizer.is_serializable()`` before
    it creates the directory or writes a byte; lowbit's quantizer answers with the error. It
    is set on every transformers model inside ``model`` that holds a QuantLinear (a
    per-model attribute, as ``from_pretrained`` sets it for bitsandbytes). A model with
    another library's quantizer keeps it; a non-transformers model is left as it is.
    lowbit's own ``save_quantized`` reads ``state_dict()``, which this does not touch.
    """
    # A PreTrainedModel exists only once transformers is imported: never import it here.
    modeling = sys.modules.get("transformers.modeling_utils")
    if modeling is None:
        return
    for module in model.modules():
        if not isinstance(module, modeling.PreTrainedModel):
            continue
        current = getattr(module, "hf_quantizer", None)
        if (current is None or isinstance(current, _hf_quantizer_class())) and any(
            isinstance(m, QuantLinear) for m in module.modules()
        ):
            module.hf_quantizer = _hf_quantizer_class()()


def __getattr__(name: str):
    # pickle finds the lazily built class by module and name (torch.save(model) keeps working)
    if name == "LowbitHfQuantizer":
        return _hf_quantizer_class()
    if name == "LowbitQuantizationConfig":
        return _hf_quantizer_class().config_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _hf_quantizer_class() -> type:
    """transformers' HfQuantizer for models lowbit quantized, built on first use: importing
    transformers costs seconds, and only code that already holds a transformers model needs it."""
    from transformers.quantizers import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class LowbitQuantizationConfig(QuantizationConfigMixin):
        def __init__(self):  # the mixin is a dataclass in transformers 5, a plain class in 4
            self.quant_method = "lowbit"

    class LowbitHfQuantizer(HfQuantizer):
        config_class = LowbitQuantizationConfig

        def __init__(self):
            super().__init__(LowbitQuantizationConfig())

        def is_serializable(self, *args, **kwargs):
            raise SavePretrainedError(SAVE_PRETRAINED_REFUSED)

        @property
        def is_trainable(self) -> bool:
            return False  # QuantLinear holds packed codes, not trainable weights

    for cls in (LowbitQuantizationConfig, LowbitHfQuantizer):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return LowbitHfQuantizer
