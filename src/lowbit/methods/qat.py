"""Quantization-aware training (``lowbit qat``): LSQ fake quantization on every target layer (``lowbit.methods.lsq``),
trained on the calibration split by distilling the original model, then converted to a regular quantized model.

``prepare`` swaps each selected ``nn.Linear`` for a ``QATLinear`` (its float weight and its ``LSQQuantizer``,
both trained); ``lowbit.methods.qat_train.train`` runs the steps (checkpoints, resume, a NaN stops it); ``convert`` puts
the layers back as ``QuantLinear`` holding ``LSQQuantizer.convert``'s bytes, through ``quantize_model``, so
the result saves and scores like ``lowbit quantize`` output and computes exactly what was trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..formats.registry import get_format
from ..layers.rotation import hadamard_block, rotate
from ..layers.surgery import QuantizeReport, plan_layers, quantize_model
from ..planning.config import QuantConfig
from ..planning.plan import QuantPlan
from ..tensor import QuantizedTensor
from .lsq import LSQQuantizer, check_learnable
from .registry import NOTHING


class QATLinear(nn.Module):
    """``y = x fake_quantize(W)^T + b`` with ``W`` and the quantizer's steps trained; the bias is frozen.

    With ``+had`` the trained weight is the rotated ``W Q`` and the input is rotated as ``QuantLinear`` rotates it
    (``lowbit.layers.rotation``, signs drawn from the layer's ``name``), so the converted layer computes the same."""

    def __init__(self, linear: nn.Linear, config: QuantConfig, init: str = "mse",
                 start: QuantizedTensor | None = None, name: str = ""):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        signs = config.layer_signs(name, linear.in_features)
        self.register_buffer("signs", signs, persistent=False)
        self.rotation_block = None if signs is None else hadamard_block(linear.in_features)
        weight = linear.weight.detach().float()
        if start is not None:  # from a quantized start (GPTQ's, rotated with +had), training begins at what it computes
            weight = start.dequantize(torch.float32)
        elif signs is not None:
            weight = rotate(weight, signs, self.rotation_block)
        self.weight = nn.Parameter(weight.float().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.quantizer = LSQQuantizer(self.weight, config.format, config.block_size, init=init, start=start)
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.signs is not None:
            x = rotate(x, self.signs, self.rotation_block)
        return F.linear(x, self.quantizer(self.weight).to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.config.label}"


def check_qat_config(config: QuantConfig) -> None:
    """What QAT cannot train, refused before any work: a format without a learnable grid, and settings that would
    change the weights after training (+dq compresses the trained scales, a search or method picks others)."""
    check_learnable(get_format(config.format))
    others = {"+dq (it would re-round the trained scales)": config.double_quant,
              "a scale search (training chooses the scales)": config.search is not None,
              # a method that needs calibration changes the weights against the model's inputs
              **{m.suffix: m.needs != NOTHING for m in config.method_classes},
              "LLM.int8() (its activations are rounded at run time)":
                  any(m.rounds_activations for m in config.method_classes)}
    given = [what for what, present in others.items() if present]
    if given:
        raise InputError(f"{config.label}: quantization-aware training cannot take {given[0]}; give the format and "
                         "block, e.g. int3/64")


def prepare(model: nn.Module, plan: QuantPlan, *, init: str = "mse",
            start: dict[str, QuantizedTensor] | None = None) -> dict[str, QATLinear]:
    """Swap every layer the plan selects for a ``QATLinear``, in place; freeze everything else.
    ``start``: layer name -> a quantized weight (GPTQ's) to begin from. Returns ``{first name: layer}``."""
    for c in plan.configs:
        check_qat_config(c)
    targets = plan_layers(model, plan)
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for names, linear, layer_config, _ in targets:
        qat = QATLinear(linear, layer_config, init=init, start=(start or {}).get(names[0]), name=names[0])
        for name in names:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, qat)
        layers[names[0]] = qat
    return layers


def convert(model: nn.Module, plan: QuantPlan) -> QuantizeReport:
    """Replace every ``QATLinear`` by a ``QuantLinear`` holding its trained weight as the quantizer stores it,
    in place (``quantize_model`` with those bytes prequantized): the model then computes what it trained."""
    qweights, linears = {}, {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(module, QATLinear):
            continue
        if id(module) not in linears:  # one layer under several names (tied) stays one layer
            with torch.no_grad():
                qweights[name] = module.quantizer.convert(module.weight)
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            linear.weight = nn.Parameter(module.weight.detach(), requires_grad=False)
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
            linears[id(module)] = linear
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linears[id(module)])
    return quantize_model(model, plan, progress=False, prequantized=qweights)
