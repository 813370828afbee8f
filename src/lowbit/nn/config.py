"""QuantConfig: what to quantize and how; the one reader of a format label (``LABEL_SYNTAX``)."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from ..checks import check_block_size
from ..formats.registry import GridCodec, codec_for, get_format
from ..formats.spec import DQ_SUFFIX, FormatSpec, fixed_block_message, no_double_quant_message
from ..pipeline import SEARCHES, check_search, needs_calibration


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
    method: str | None = None  # "gptq" (lowbit.nn.gptq); None: each weight rounded on its own
    rotate: bool = False  # "+had": a randomized Hadamard rotation of the input dimension (lowbit.nn.rotation)
    refit_codebook: bool = False  # "+cb": the learned codebook refit to the output error (lowbit.nn.codebook_refit)
    awq: bool = False  # "+awq": activation-aware input-channel scales folded into the op before (lowbit.nn.awq)

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
        if self.method is not None:
            if self.method not in METHODS:
                raise ValueError(f"unknown method {self.method!r}: the one method is gptq (GPTQ, arXiv 2210.17323)")
            if not issubclass(codec_for(spec), GridCodec):
                raise ValueError(f"GPTQ needs a format whose elements are levels on a grid; {spec.name} is a GGUF "
                                 "block format: try int4, int4_asym, nf4 or fp4_e2m1")
        if self.rotate and needs_calibration(self.search) and not self.method:
            raise ValueError(f"+had with @{self.search} needs +gptq: the rotated inputs' importance is the diagonal "
                             "of the rotated Hessian, which GPTQ collects")
        if self.refit_codebook:
            if self.method != "gptq":
                raise ValueError(f"{CODEBOOK_SUFFIX} refits the codebook to the layer's output error on GPTQ's "
                                 f"Hessian: add +gptq, e.g. lloyd4/32+dq+gptq{CODEBOOK_SUFFIX}")
            if codec_for(spec).family != "learned":
                raise ValueError(f"{CODEBOOK_SUFFIX} refits a codebook stored with the tensor; {spec.name} has "
                                 "none: use a learned codebook format, lloyd2..lloyd8 or qq2..qq8")
        for key in ("include", "exclude"):
            value = getattr(self, key)
            # a bare string would otherwise be read as one pattern per character
            object.__setattr__(self, key, (value,) if isinstance(value, str) else tuple(value))

    @property
    def label(self) -> str:
        """``FORMAT[/BLOCK][+dq][+awq][+had][+gptq][+cb][@SEARCH]``, the name reports and ``--formats`` use
        (block only if not the default)."""
        spec = get_format(self.format)
        block = "" if self.block_size in (None, spec.default_block_size) else f"/{self.block_size}"
        search = f"@{self.search}" if self.search else ""
        method = f"+{self.method}" if self.method else ""
        rotate = ROTATE_SUFFIX if self.rotate else ""
        refit = CODEBOOK_SUFFIX if self.refit_codebook else ""
        awq = AWQ_SUFFIX if self.awq else ""
        return f"{spec.name}{block}{DQ_SUFFIX if self.double_quant else ''}{awq}{rotate}{method}{refit}{search}"

    @property
    def needs_calibration(self) -> bool:
        """Whether quantizing needs calibration activations (an activation-weighted search, GPTQ, or AWQ)."""
        return needs_calibration(self.search) or self.method is not None or self.awq

    @property
    def needs_importance(self) -> bool:
        """Whether quantizing needs the calibration importance (mean x^2 per input channel): an activation-weighted
        search rounding on its own. GPTQ weighs a search by its own Hessian's diagonal instead."""
        return needs_calibration(self.search) and not self.method

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
        methods = [s for s in suffixes if s in METHODS]
        if len(methods) > 1:
            raise ValueError(f"{label!r}: +{methods[0]} given more than once")
        flags = {}
        for flag, suffix in FLAGS:
            given = sum(f"+{s}" == suffix for s in suffixes)
            if given > 1:
                raise ValueError(f"{label!r}: {suffix} given more than once")
            if given:
                flags[flag] = True
        suffixes = [s for s in suffixes if s not in METHODS and f"+{s}" not in dict(FLAGS).values()]
        for suffix in suffixes:
            if "/" in suffix:
                raise ValueError(f"{label!r}: the block size goes before {DQ_SUFFIX}, e.g. nf4/128{DQ_SUFFIX}")
            if not suffix:
                raise ValueError(f"{label!r}: nothing after '+'; the only suffix is {DQ_SUFFIX}, e.g. nf4{DQ_SUFFIX}")
            if f"+{suffix}" != DQ_SUFFIX:
                hint = f"; did you mean {head}{DQ_SUFFIX}?" if suffix.lower() == DQ_SUFFIX[1:] else ""
                raise ValueError(f"{label!r}: unknown suffix {'+' + suffix!r}; the suffixes are {DQ_SUFFIX} "
                                 f"(double quantization), {AWQ_SUFFIX} (AWQ scales), {ROTATE_SUFFIX} (Hadamard "
                                 f"rotation), +gptq (GPTQ) and {CODEBOOK_SUFFIX} (codebook refit), "
                                 f"lower case{hint}")
        if len(suffixes) > 1:
            raise ValueError(f"{label!r}: {DQ_SUFFIX} given more than once")
        name, slash, block = head.partition("/")
        if not name.strip():
            if slash:
                raise ValueError(f"{label!r} names no format before the '/': expected {LABEL_SYNTAX}")
            raise ValueError(f"{label!r} names no format: write FORMAT{DQ_SUFFIX}, e.g. nf4{DQ_SUFFIX}")
        return cls(format=name, block_size=_parse_block(label, block) if slash else None,
                   double_quant=bool(suffixes), search=search.strip() if at else None,
                   **({"method": methods[0]} if methods else {}), **flags, **kwargs)

    def selects(self, name: str) -> bool:
        included = not self.include or any(matches(name, p) for p in self.include)
        return included and not any(matches(name, p) for p in self.exclude)


METHODS = ("gptq",)  # rounding methods beyond round-to-nearest (lowbit.nn.gptq)
ROTATE_SUFFIX = "+had"
CODEBOOK_SUFFIX = "+cb"
AWQ_SUFFIX = "+awq"
FLAGS = (("rotate", ROTATE_SUFFIX), ("refit_codebook", CODEBOOK_SUFFIX), ("awq", AWQ_SUFFIX))  # QuantConfig fields
AWQ_ATTRIBUTE = "lowbit_awq"  # set on a model lowbit.nn.awq.awq_scale has scaled: {layer name: s}
LABEL_SYNTAX = ("FORMAT[/BLOCK][+dq][+awq][+had][+gptq][+cb][@SEARCH], e.g. nf4, int4/128, nf4/64+dq, int4+gptq, "
                "nf4/32+dq+had+gptq@amse, lloyd4/32+dq+gptq+cb, int4_asym/64@hqq (`lowbit formats` lists the formats)")


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


def matches(name: str, pattern: str) -> bool:
    parts = name.split(".")
    return any(fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))
