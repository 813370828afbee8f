"""LLM.int8() is a method its whole label names (int8_outlier): it makes the layer, one block per row."""

import pytest
import torch
from torch import nn

from lowbit.errors import InputError
from lowbit.layers.outlier_linear import Int8OutlierLinear
from lowbit.layers.surgery import layer_module, quantize_weight
from lowbit.methods.llm_int8 import LLMInt8
from lowbit.methods.registry import method_for, suffixes
from lowbit.planning import QuantConfig


def test_the_label_names_the_method_and_no_suffix_does():
    config = QuantConfig.parse("int8_outlier/3.5")
    assert config.method_classes == (LLMInt8,) and config.methods == ()
    assert method_for("int8_outlier") is LLMInt8 and "int8_outlier" not in suffixes()
    assert QuantConfig.parse("int8").method_classes == ()
    with pytest.raises(InputError, match="unknown suffix '\\+int8_outlier'"):
        QuantConfig.parse("int8+int8_outlier")


def test_it_makes_its_layer_with_one_block_per_row():
    torch.manual_seed(0)
    linear = nn.Linear(96, 8)
    config = QuantConfig.parse("int8_outlier/3.5")
    q = quantize_weight(linear.weight.detach(), config)
    assert q.block_size == 96 and q.format.name == "int8"
    layer = layer_module("l", linear, q, None, config)
    assert isinstance(layer, Int8OutlierLinear) and layer.threshold == 3.5 and layer.name == "l"
    plain = layer_module("l", linear, q, None, QuantConfig.parse("int8/96"))
    assert type(plain).__name__ == "QuantLinear"
