"""Model surgery: replace a model's nn.Linear layers by QuantLinear, in place."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from ..checks import check_block_size
from ..errors import LayerQuantizeError
from ..formats.registry import get_format
from ..formats.spec import DQ_SUFFIX, FormatSpec, fixed_block_message, no_double_quant_message
from ..pipeline import SEARCHES, check_search, needs_calibration
from ..progress import progress_bar
from ..quantize import quantize
from .hf_quantizer import refuse_save_pretrained
from .linear import QuantLinear


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how (one entry point, torchao ``quantize_``-style).

    ``include``/``exclude`` are fnmatch patterns on module names. A pattern matches the
    full dotted name or any dotted tail of it, so ``"lm_head"`` also matches
    ``"model.lm_head"`` and ``"q_proj"`` matches every ``"...self_attn.q_proj"``. Empty
    ``include`` means every ``nn.Linear``; ``exclude`` wins over ``include``.
    ``dequantized_weights`` keeps each dequantized weight cached (fast evaluation, same
    numbers, but the model then holds full-precision bytes again).
    """

    format: str | FormatSpec
    block_size: int | None = None
    double_quant: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ("lm_head",)
    dequantized_weights: bool = False
    search: str | None = None  # scale search (lowbit.pipeline.SEARCHES); None: the format's own rule

    def __post_init__(self):
        # Settings wrong for every layer fail here, before any layer is touched, rather
        # than as a LayerQuantizeError that would blame the first layer.
        if isinstance(self.format, str) and any(c in self.format for c in "/+@"):
            raise ValueError(f"{self.format!r} is a format label, not a format name: use QuantConfig.parse")
        spec = get_format(self.format)
        if self.block_size is not None:
            check_block_size(self.block_size)
            if spec.fixed_block_size and self.block_size != spec.default_block_size:
                raise ValueError(fixed_block_message(spec, self.block_size))
        if self.double_quant and not spec.double_quant:
            raise ValueError(no_double_quant_message(spec))
        if self.search is not None:
            object.__setattr__(self, "search", check_search(spec, self.search))
        for key in ("include", "exclude"):
            value = getattr(self, key)
            # a bare string would otherwise be read as one pattern per character
            object.__setattr__(self, key, (value,) if isinstance(value, str) else tuple(value))

    @property
    def label(self) -> str:
        """``FORMAT[/BLOCK][+dq][@SEARCH]``, the name reports and ``--formats`` use (block only if
        not the default)."""
        spec = get_format(self.format)
        block = "" if self.block_size in (None, spec.default_block_size) else f"/{self.block_size}"
        search = f"@{self.search}" if self.search else ""
        return f"{spec.name}{block}{DQ_SUFFIX if self.double_quant else ''}{search}"

    @property
    def needs_calibration(self) -> bool:
        """Whether quantizing needs calibration activations (an activation-weighted search)."""
        return needs_calibration(self.search)

    @classmethod
    def parse(cls, label: str, **kwargs) -> QuantConfig:
        """``"nf4"``, ``"int4/128"``, ``"nf4+dq"``, ``"nf4/64+dq"``, ``"int4_asym/64@hqq"`` -> QuantConfig
        (``kwargs`` for the rest).

        The one reader of a format label: every command that takes one calls this, so a
        label means the same, and is refused with the same words, everywhere."""
        text = label.strip()
        if not text:
            raise ValueError(f"empty format label: expected {LABEL_SYNTAX}")
        text, at, search = text.partition("@")
        if at and (not search.strip() or "@" in search or "/" in search or "+" in search):
            raise ValueError(f"{label!r}: the scale search goes last and once, e.g. nf4/64+dq@mse; "
                             f"searches: {', '.join(SEARCHES)}")
        head, *suffixes = text.split("+")
        for suffix in suffixes:
            if "/" in suffix:
                raise ValueError(f"{label!r}: the block size goes before {DQ_SUFFIX}, e.g. nf4/128{DQ_SUFFIX}")
            if not suffix:
                raise ValueError(f"{label!r}: nothing after '+'; the only suffix is {DQ_SUFFIX}, e.g. nf4{DQ_SUFFIX}")
            if f"+{suffix}" != DQ_SUFFIX:
                hint = f"; did you mean {head}{DQ_SUFFIX}?" if suffix.lower() == DQ_SUFFIX[1:] else ""
                raise ValueError(f"{label!r}: unknown suffix {'+' + suffix!r}; the only suffix is {DQ_SUFFIX} "
                                 f"(double quantization, lower case){hint}")
        if len(suffixes) > 1:
            raise ValueError(f"{label!r}: {DQ_SUFFIX} given more than once")
        name, slash, block = head.partition("/")
        if not name.strip():
            if slash:
                raise ValueError(f"{label!r} names no format before the '/': expected {LABEL_SYNTAX}")
            raise ValueError(f"{label!r} names no format: write FORMAT{DQ_SUFFIX}, e.g. nf4{DQ_SUFFIX}")
        return cls(format=name, block_size=_parse_block(label, block) if slash else None,
                   double_quant=bool(suffixes), search=search.strip() if at else None, **kwargs)

    def selects(self, name: str) -> bool:
        included = not self.include or any(_matches(name, p) for p in self.include)
        return included and not any(_matches(name, p) for p in self.exclude)


LABEL_SYNTAX = ("FORMAT[/BLOCK][+dq][@SEARCH], e.g. nf4, int4/128, nf4/64+dq, int4_asym/64@hqq "
                "(`lowbit formats` lists the formats)")


def _parse_block(label: str, block: str) -> int:
    text = block.strip()
    if not text:
        raise ValueError(f"{label!r}: no block size after '/'; write e.g. nf4/128, or leave out the '/'")
    if "/" in text:
        raise ValueError(f"{label!r}: one /BLOCK only; expected {LABEL_SYNTAX}")
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{label!r}: block size {text!r} is not a whole number of weights; expected {LABEL_SYNTAX}")
    if int(text) == 0:
        raise ValueError(f"{label!r}: block size 0; a block holds at least 1 weight")
    return int(text)


@dataclass(frozen=True)
class QuantizeReport:
    """What ``quantize_model`` did. Bytes are measured from stored tensors, never estimated.

    ``layer_bytes_*``: the replaced layers' weights only (fp32 ``numel * element_size``
    before, ``QuantizedTensor.nbytes`` after). ``model_bytes_*``: every tensor the model
    holds (parameters, buffers, packed parts, cached dequantized weights), shared or tied
    tensors counted once.
    """

    format: str
    layers: tuple[str, ...]
    layer_numel: int
    layer_bytes_before: int
    layer_bytes_after: int
    model_bytes_before: int
    model_bytes_after: int
    seconds: float

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight of the replaced layers, scales and metadata included."""
        return 8 * self.layer_bytes_after / self.layer_numel if self.layer_numel else 0.0

    @property
    def layer_ratio(self) -> float:
        return self.layer_bytes_after / self.layer_bytes_before if self.layer_bytes_before else 1.0

    @property
    def model_ratio(self) -> float:
        return self.model_bytes_after / self.model_bytes_before if self.model_bytes_before else 1.0


def quantize_model(model: nn.Module, config: QuantConfig | str, *, progress: bool = True,
                   importance: dict[str, torch.Tensor] | None = None) -> QuantizeReport:
    """Replace the selected ``nn.Linear`` layers of ``model`` by ``QuantLinear``, in place.

    Every layer is quantized before any is swapped, so a layer that cannot be stored in
    the format (``LayerQuantizeError``, naming it) leaves the model untouched. A string
    ``config`` is a label, ``QuantConfig.parse(config)``: ``"nf4"``, ``"int4/128"``, ``"nf4+dq"``.
    ``importance``: layer name -> ``(in_features,)`` mean squared input activation
    (``lowbit.eval.calibration``), which an activation-weighted search (``@amse``) needs.
    """
    if isinstance(config, str):
        config = QuantConfig.parse(config)
    spec = get_format(config.format)
    start = time.perf_counter()
    before = model_weight_bytes(model)
    targets = _selected(model, config)
    if config.needs_calibration:
        missing = [names[0] for names, _ in targets if not any(n in (importance or {}) for n in names)]
        if missing:
            raise ValueError(f"@{config.search} needs calibration activations for every layer; none for "
                             f"{missing[0]}{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}")

    replacements: list[tuple[list[str], QuantLinear]] = []
    with progress_bar(len(targets), f"quantizing to {spec.name}", enabled=progress) as advance:
        for names, linear in targets:
            weights = next((importance[n] for n in names if n in (importance or {})), None)
            qweight = _quantize_layer(names[0], linear.weight.detach(), config,
                                      importance=weights if config.needs_calibration else None)
            replacements.append((names, QuantLinear.from_linear(linear, qweight)))
            advance()

    layer_numel = layer_before = layer_after = 0
    for names, qlinear in replacements:
        for name in names:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, qlinear)
        if config.dequantized_weights:
            qlinear.materialize()
        layer_numel += qlinear.qweight.numel
        layer_before += qlinear.qweight.numel * qlinear.qweight.dtype.itemsize
        layer_after += qlinear.qweight.nbytes
    refuse_save_pretrained(model)  # transformers' save_pretrained would silently drop every QuantLinear
    return QuantizeReport(
        format=spec.name,
        layers=tuple(name for names, _ in replacements for name in names),
        layer_numel=layer_numel,
        layer_bytes_before=layer_before,
        layer_bytes_after=layer_after,
        model_bytes_before=before,
        model_bytes_after=model_weight_bytes(model),
        seconds=time.perf_counter() - start,
    )


def check_config(model: nn.Module, config: QuantConfig) -> None:
    """Raise what ``quantize_model(model, config)`` would for its layout, without quantizing:
    no layer selected, or a layer whose shape the format cannot hold (``LayerQuantizeError``).
    Lets ``compare`` refuse a bad format list before minutes of scoring, not halfway through."""
    targets = _selected(model, config)
    seen = set()
    for names, linear in targets:
        # the layout rules (GGUF whole blocks per row, block sizes) depend on the row length only
        if linear.in_features not in seen:
            seen.add(linear.in_features)
            _quantize_layer(names[0], torch.zeros(1, linear.in_features), replace(config, search=None),
                            shape=linear.weight.shape)


def _selected(model: nn.Module, config: QuantConfig) -> list[tuple[list[str], nn.Linear]]:
    targets = select_linears(model, config)
    if not targets:
        raise ValueError(f"no nn.Linear layer matched include={config.include} exclude={config.exclude}")
    return targets


def select_linears(model: nn.Module, config: QuantConfig) -> list[tuple[list[str], nn.Linear]]:
    """The layers ``config`` selects, each once, with every name it is reachable under."""
    by_id: dict[int, tuple[list[str], nn.Linear]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        # nn.MultiheadAttention reads out_proj.weight directly instead of calling it, so
        # its NonDynamicallyQuantizableLinear cannot be swapped (torch.ao skips it too).
        if not isinstance(module, nn.Linear) or isinstance(module, NonDynamicallyQuantizableLinear):
            continue
        if not name:
            raise ValueError("the model itself is an nn.Linear: no parent to swap it in; use QuantLinear.from_linear")
        by_id.setdefault(id(module), ([], module))[0].append(name)
    return [(names, m) for names, m in by_id.values() if any(config.selects(n) for n in names)]


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model holds, each storage region counted once."""
    tensors: list[torch.Tensor] = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        if isinstance(module, QuantLinear):
            tensors.extend(module.qweight.parts.values())
            if module._dequantized is not None:
                tensors.append(module._dequantized)
    seen: set[tuple] = set()
    total = 0
    for t in tensors:
        if t.device.type == "meta":  # holds no memory
            continue
        nbytes = t.numel() * t.element_size()
        key = (t.device, t.data_ptr(), nbytes)  # tied weights share data_ptr and size
        if key not in seen:
            seen.add(key)
            total += nbytes
    return total


def quantize_weight(weight: torch.Tensor, config: QuantConfig, importance: torch.Tensor | None = None):
    """One weight tensor quantized as ``config`` says (format, block, double quant, search)."""
    return quantize(weight, config.format, block_size=config.block_size, double_quant=config.double_quant,
                    search=config.search, importance=importance)


def _quantize_layer(name: str, weight: torch.Tensor, config: QuantConfig, shape: torch.Size | None = None,
                    importance: torch.Tensor | None = None):
    try:
        return quantize_weight(weight, config, importance)
    except ValueError as e:
        out_f, in_f = shape or weight.shape
        raise LayerQuantizeError(f"layer {name!r} (weight {out_f}x{in_f}): {e}") from e


def _matches(name: str, pattern: str) -> bool:
    parts = name.split(".")
    return any(fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))
