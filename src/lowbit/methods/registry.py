"""The methods a label names after its format (``+awq``, ``+had``, ``+gptq``, ``+cb``), registered by suffix.

A method is a class with one interface (``Method``): the calibration it needs and its part in the calibration pass
(``consumer``), the label combinations it refuses (``check``, called by ``planning.config`` while a label is read)
and how it changes the model or a layer's weight. Looking a method up imports no torch, as looking a format up does
not (``formats.registry``): the label facts (suffix, order, what calibration) are the classes' own, and each
method's module imports torch only in the functions that compute. Adding a method is one module holding its
``Method`` subclass decorated with ``register``; a built-in one also has its line in ``MODULES``, so that it is
found without being imported first.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, ClassVar

from ..errors import InputError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..calibration.engine import Consumer
    from ..planning.config import QuantConfig
    from ..planning.plan import QuantPlan
    from ..tensor import QuantizedTensor

# What calibration a method needs, served by the block-by-block engine (lowbit.calibration.engine)
NOTHING = "nothing"
IMPORTANCE = "importance"  # mean x^2 per input channel of each layer it rounds
HESSIAN = "hessian"  # each layer's 2/n X^T X
BLOCK = "block"  # a block's inputs and outputs (statistics of the layers inside, and a check of the block)
TRAINING = "training"  # training batches (LSQ: lowbit qat)
NEEDS = (NOTHING, IMPORTANCE, HESSIAN, BLOCK, TRAINING)

# the built-in methods: suffix -> the module that registers its class, in label order
# (FORMAT[/BLOCK][+dq][+awq][+had][+gptq][+cb]); a method registered from elsewhere comes after them
MODULES = {"+awq": "lowbit.methods.awq_method", "+had": "lowbit.methods.hadamard",
           "+gptq": "lowbit.methods.gptq_method", "+cb": "lowbit.methods.codebook_method"}

# methods a whole label names rather than a suffix: LLM.int8()'s int8_outlier[/THRESHOLD] (planning.config reads
# the label and asks for it with ``method_for``)
NAMED_MODULES = ("lowbit.methods.llm_int8",)

_REGISTERED: dict[str, type[Method]] = {}


class Method:
    """One method of a label. Class attributes are the label facts; the class methods are the behaviour."""

    suffix: ClassVar[str]  # "+awq": how a label names it
    needs: ClassVar[str] = NOTHING  # one of NEEDS
    # the method makes the layer's quantized weight itself (GPTQ): quantize_model takes it as prequantized=
    prequantizes: ClassVar[bool] = False
    row_blocks: ClassVar[bool] = False  # the weight has one block per row, whatever the label says (LLM.int8())
    # the layer rounds its input at run time (LLM.int8()): its cost is not its weight's error alone
    rounds_activations: ClassVar[bool] = False

    @classmethod
    def uses(cls, config: QuantConfig | None) -> bool:
        """Whether ``config``'s label names this method."""
        return config is not None and cls.suffix in config.methods

    @classmethod
    def consumer(cls, model: nn.Module, plan: QuantPlan, layers: frozenset[str]) -> Consumer | None:
        """Its part in the block-by-block calibration pass (``lowbit.calibration.engine.Consumer``) for ``layers``
        (the qualified names of the layers of ``model`` whose config names it), or None where it needs none of its
        own. A consumer that changes the model (``needs == BLOCK``) runs before the others at each block; one whose
        method ``prequantizes`` has ``weights``, ``{layer: QuantizedTensor}``, once the pass is done."""
        return None

    @classmethod
    def quantize_layer(cls, name: str, weight: torch.Tensor, hessian: torch.Tensor,
                       config: QuantConfig) -> QuantizedTensor:
        """A method that ``prequantizes``: layer ``name``'s weight rounded against its inputs' Hessian
        ``H = 2/n X^T X``."""
        raise NotImplementedError(f"{cls.suffix} does not make a layer's quantized weight")

    @classmethod
    def refine(cls, config: QuantConfig, weight: torch.Tensor, hessian: torch.Tensor, result, requantize):
        """What this method makes of the result of the method that made the weight (``+cb`` refits GPTQ's codebook);
        ``requantize(tensor_parts)`` reruns that method with new per-tensor parts. Default: ``result`` unchanged."""
        return result

    @classmethod
    def refines(cls) -> bool:
        """Whether ``refine`` does anything (it then reads the Hessian again after the method that made the weight)."""
        return cls.refine.__func__ is not Method.refine.__func__

    @classmethod
    def check(cls, config: QuantConfig) -> None:
        """Refuse (InputError) a label this method cannot run with; called once per label, before any model loads."""

    @classmethod
    def layer_signs(cls, name: str, in_features: int) -> torch.Tensor | None:
        """The signs of the input rotation the layer stores (``+had``), else None."""
        return None

    @classmethod
    def prepare_weight(cls, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The weight as layer ``name`` stores it, before it is rounded on its own (``+had``: ``W Q``)."""
        return weight

    @classmethod
    def make_layer(cls, name: str, linear: nn.Linear, qweight: QuantizedTensor, signs: torch.Tensor | None,
                   config: QuantConfig) -> nn.Module | None:
        """The module that computes with the layer's quantized weight, where it is not ``QuantLinear``."""
        return None

    @classmethod
    def unmet(cls, model, name: str) -> str | None:
        """Why layer ``name`` of ``model`` cannot be rounded yet (a whole-model step of this method has not run on
        it: ``+awq``'s scales), or None; ``quantize_model`` refuses the model with it."""
        return None


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: ``cls`` becomes the method its ``suffix`` names."""
    named = cls.__module__ in NAMED_MODULES
    if not named and not (cls.suffix.startswith("+") and cls.suffix[1:].isalnum() and cls.suffix[1:].islower()):
        raise RuntimeError(f"a method's suffix is '+' and lower-case letters or digits, got {cls.suffix!r}")
    if cls.needs not in NEEDS:
        raise RuntimeError(f"method {cls.suffix!r} needs {cls.needs!r}, not one of {NEEDS}")
    if _REGISTERED.get(cls.suffix, cls) is not cls:
        raise RuntimeError(f"method {cls.suffix!r} registered twice")
    _REGISTERED[cls.suffix] = cls
    return cls


def suffixes() -> tuple[str, ...]:
    """Every method's suffix, in label order."""
    return (*MODULES, *(s for s, m in _REGISTERED.items() if s not in MODULES and m.__module__ not in NAMED_MODULES))


def method_for(suffix: str) -> type[Method]:
    """The method a label suffix names (``"+gptq"``), or a whole label (``"int8_outlier"``); an unknown one is an
    InputError."""
    if suffix not in _REGISTERED:
        for module in (MODULES[suffix],) if suffix in MODULES else NAMED_MODULES:
            import_module(module)
    if suffix not in _REGISTERED:
        raise InputError(f"unknown method {suffix!r}: the methods are {', '.join(suffixes())}")
    return _REGISTERED[suffix]


def ordered(given) -> tuple[str, ...]:
    """``given`` suffixes in label order (how ``QuantConfig.methods`` holds them)."""
    return tuple(s for s in suffixes() if s in given)
