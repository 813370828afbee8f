"""QuantConfig: what to quantize and how; the one reader of a format label (``LABEL_SYNTAX``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from ..formats.registry import get_format
from ..formats.spec import DQ_SUFFIX, FormatSpec, fixed_block_message, no_double_quant_message
from ..limits import BLOCK_SIZE, check_block_size
from ..methods import registry

# Reading a label imports no torch (`lowbit formats LABEL` answers in a fraction of a second): the
# scale searches (lowbit.pipeline) are imported where a label names one.


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a layer: its tensor format (format, block, double quant, scale search) and the methods
    its label names. Which layers take it is a ``QuantPlan``'s business (``QuantPlan.uniform``).
    """

    format: str | FormatSpec
    block_size: int | None = None
    double_quant: bool = False
    search: str | None = None  # scale search (lowbit.pipeline.SEARCHES); None: the format's own rule
    # the label's methods (lowbit.methods.registry), as suffixes in label order: ("+awq", "+gptq"); none: each
    # weight rounded to the nearest level on its own
    methods: tuple[str, ...] = ()
    # LLM.int8() (label int8_outlier[/THRESHOLD], lowbit.layers.outlier_linear): int8 weights with one scale per row,
    # int8 activations, the input columns with |x| >= threshold in float; 0 turns the decomposition off
    outlier_threshold: float | None = None

    def __post_init__(self):
        # Settings wrong for every layer fail here, before any layer is touched, rather
        # than as a LayerQuantizeError that would blame the first layer.
        if isinstance(self.format, str) and any(c in self.format for c in "/+@"):
            raise InputError(f"{self.format!r} is a format label, not a format name: use QuantConfig.parse")
        if self.format == OUTLIER_FORMAT:
            object.__setattr__(self, "format", "int8")
            if self.outlier_threshold is None:
                object.__setattr__(self, "outlier_threshold", DEFAULT_THRESHOLD)
        if self.outlier_threshold is not None:
            self._check_outlier()
        spec = get_format(self.format)
        if self.block_size is not None:
            check_block_size(self.block_size)
            if spec.fixed_block_size and self.block_size != spec.default_block_size:
                raise InputError(fixed_block_message(spec, self.block_size))
        if self.double_quant and not spec.double_quant:
            raise InputError(no_double_quant_message(spec))
        if self.search is not None:
            from ..pipeline import check_search

            object.__setattr__(self, "search", check_search(spec, self.search))
        methods = tuple(self.methods)
        if methods != registry.ordered(methods) or len(set(methods)) != len(methods):
            for suffix in methods:
                registry.method_for(suffix)  # an unknown one is named
            raise InputError(f"methods {methods} are not once each in label order ({', '.join(registry.suffixes())})")
        object.__setattr__(self, "methods", methods)
        for suffix in methods:
            registry.method_for(suffix).check(self)

    def _check_outlier(self) -> None:
        object.__setattr__(self, "outlier_threshold", check_threshold(self.outlier_threshold))
        others = {"a format other than int8": get_format(self.format).name != "int8",
                  "a block size (the weights have one scale per row)": self.block_size is not None,
                  DQ_SUFFIX: self.double_quant, "a scale search": self.search is not None,
                  **{suffix: True for suffix in self.methods}}
        given = [what for what, present in others.items() if present]
        if given:
            raise InputError(f"{OUTLIER_FORMAT} (LLM.int8()) cannot take {given[0]}: its weights are int8 with one "
                             f"absmax per row; write {OUTLIER_FORMAT} or {OUTLIER_FORMAT}/THRESHOLD, e.g. "
                             f"{OUTLIER_FORMAT}/3.5")

    @property
    def format_name(self) -> str:
        """The format part of the label: ``int8_outlier`` for LLM.int8(), else the format's name."""
        return OUTLIER_FORMAT if self.outlier_threshold is not None else get_format(self.format).name

    @property
    def label(self) -> str:
        """``FORMAT[/BLOCK][+dq][+awq][+had][+gptq][+cb][@SEARCH]``, the name reports and ``--formats`` use
        (block only if not the default); ``int8_outlier[/THRESHOLD]`` (threshold only if not 6)."""
        if self.outlier_threshold is not None:
            t = self.outlier_threshold
            text = format(t, "g") if float(format(t, "g")) == t else repr(t)
            return OUTLIER_FORMAT + ("" if t == DEFAULT_THRESHOLD else f"/{text}")
        spec = get_format(self.format)
        block = "" if self.block_size in (None, spec.default_block_size) else f"/{self.block_size}"
        search = f"@{self.search}" if self.search else ""
        return f"{spec.name}{block}{DQ_SUFFIX if self.double_quant else ''}{''.join(self.methods)}{search}"

    @property
    def needs_calibration(self) -> bool:
        """Whether quantizing needs calibration activations: an activation-weighted search, or a method that does."""
        from ..pipeline import needs_calibration

        return needs_calibration(self.search) or any(m.needs != registry.NOTHING for m in self.method_classes)

    @property
    def needs_importance(self) -> bool:
        """Whether quantizing needs the calibration importance (mean x^2 per input channel): an activation-weighted
        search rounding on its own. A method that makes the weight itself (GPTQ) weighs a search by its own
        Hessian's diagonal instead."""
        from ..pipeline import needs_calibration

        return needs_calibration(self.search) and not self.prequantized

    @property
    def prequantized(self) -> bool:
        """Whether a method makes the layers' quantized weights (``quantize_model``'s ``prequantized=``)."""
        return any(m.prequantizes for m in self.method_classes)

    @property
    def method_classes(self) -> tuple:
        """The ``lowbit.methods.registry.Method`` classes of ``methods``, in label order; LLM.int8()'s, which its
        whole label names (``int8_outlier``), last."""
        named = (registry.method_for(OUTLIER_FORMAT),) if self.outlier_threshold is not None else ()
        return (*(registry.method_for(s) for s in self.methods), *named)

    def layer_signs(self, name: str, in_features: int):
        """The signs of the input rotation layer ``name`` stores, where a method rotates it (``+had``), else None."""
        return next((s for m in self.method_classes if (s := m.layer_signs(name, in_features)) is not None), None)

    @classmethod
    def parse(cls, label: str) -> QuantConfig:
        """``"nf4"``, ``"int4/128"``, ``"nf4+dq"``, ``"nf4/64+dq"``, ``"int4_asym/64@hqq"`` -> QuantConfig.

        The one reader of a format label: every command that takes one calls this, so a
        label means the same, and is refused with the same words, everywhere."""
        text = label.strip()
        if not text:
            raise InputError(f"empty format label: expected {LABEL_SYNTAX}")
        if text.partition("/")[0].partition("+")[0].partition("@")[0].strip() == OUTLIER_FORMAT:
            return cls(format=OUTLIER_FORMAT, outlier_threshold=_parse_threshold(label, text))
        text, at, search = text.partition("@")
        if at and (not search.strip() or "@" in search or "/" in search or "+" in search):
            from ..pipeline import SEARCHES

            raise InputError(f"{label!r}: the scale search goes last and once, e.g. nf4/64+dq@mse; "
                             f"searches: {', '.join(SEARCHES)}")
        head, *suffixes = text.split("+")
        known = registry.suffixes()
        methods = [f"+{s}" for s in suffixes if f"+{s}" in known]
        twice = next((m for m in methods if methods.count(m) > 1), None)
        if twice:
            raise InputError(f"{label!r}: {twice} given more than once")
        suffixes = [s for s in suffixes if f"+{s}" not in known]
        for suffix in suffixes:
            if "/" in suffix:
                raise InputError(f"{label!r}: the block size goes before {DQ_SUFFIX}, e.g. nf4/128{DQ_SUFFIX}")
            if not suffix:
                raise InputError(f"{label!r}: nothing after '+'; the only suffix is {DQ_SUFFIX}, e.g. nf4{DQ_SUFFIX}")
            if f"+{suffix}" != DQ_SUFFIX:
                hint = f"; did you mean {head}{DQ_SUFFIX}?" if suffix.lower() == DQ_SUFFIX[1:] else ""
                raise InputError(f"{label!r}: unknown suffix {'+' + suffix!r}; the suffixes are {DQ_SUFFIX} "
                                 f"(double quantization) and the methods {', '.join(known)} (lowbit.methods), "
                                 f"lower case{hint}")
        if len(suffixes) > 1:
            raise InputError(f"{label!r}: {DQ_SUFFIX} given more than once")
        name, slash, block = head.partition("/")
        if not name.strip():
            if slash:
                raise InputError(f"{label!r} names no format before the '/': expected {LABEL_SYNTAX}")
            raise InputError(f"{label!r} names no format: write FORMAT{DQ_SUFFIX}, e.g. nf4{DQ_SUFFIX}")
        return cls(format=name, block_size=_parse_block(label, block) if slash else None,
                   double_quant=bool(suffixes), search=search.strip() if at else None,
                   methods=registry.ordered(methods))

OUTLIER_FORMAT = "int8_outlier"  # LLM.int8()'s label (lowbit.layers.outlier_linear)
DEFAULT_THRESHOLD = 6.0  # the paper's outlier magnitude (§3.2) and bitsandbytes' llm_int8_threshold default
AWQ_ATTRIBUTE = "lowbit_awq"  # set on a model lowbit.methods.awq.AWQScales has scaled: {layer name: s}
LABEL_SYNTAX = ("FORMAT[/BLOCK][+dq][+awq][+had][+gptq][+cb][@SEARCH], e.g. nf4, int4/128, nf4/64+dq, int4+gptq, "
                "nf4/32+dq+had+gptq@amse, lloyd4/32+dq+gptq+cb, int4_asym/64@hqq; LLM.int8(): int8_outlier[/THRESHOLD] "
                "(`lowbit formats` lists the formats)")


def check_threshold(threshold: float) -> float:
    """LLM.int8()'s outlier threshold: a finite number >= 0 (0 turns the decomposition off)."""
    threshold = float(threshold)
    if not threshold >= 0 or threshold == float("inf"):
        raise InputError(f"the outlier threshold is a finite number >= 0 (0 turns the decomposition off), "
                         f"got {threshold}")
    return threshold


def _parse_threshold(label: str, text: str) -> float:
    """``int8_outlier`` -> 6.0, ``int8_outlier/3.5`` -> 3.5: for LLM.int8() the part after '/' is the threshold."""
    if any(c in text for c in "+@"):
        raise InputError(f"{label!r}: {OUTLIER_FORMAT} (LLM.int8()) takes no suffix or scale search; write "
                         f"{OUTLIER_FORMAT} or {OUTLIER_FORMAT}/THRESHOLD, e.g. {OUTLIER_FORMAT}/3.5")
    _, slash, value = text.partition("/")
    if not slash:
        return DEFAULT_THRESHOLD
    try:
        threshold = float(value.strip())
    except ValueError:
        raise InputError(f"{label!r}: after {OUTLIER_FORMAT}/ comes the outlier threshold, a number >= 0 "
                         f"(default {DEFAULT_THRESHOLD:g}; 0 turns the decomposition off), got {value!r}") from None
    try:
        return check_threshold(threshold)
    except ValueError as e:
        raise InputError(f"{label!r}: {e}") from None


def _parse_block(label: str, block: str) -> int:
    text = block.strip()
    if not text:
        raise InputError(f"{label!r}: no block size after '/'; write e.g. nf4/128, or leave out the '/'")
    if "/" in text:
        raise InputError(f"{label!r}: one /BLOCK only; expected {LABEL_SYNTAX}")
    if not (text.isascii() and text.isdigit()):
        raise InputError(f"{label!r}: block size {text!r} is not a whole number of weights; expected {LABEL_SYNTAX}")
    if int(text[:40]) == 0:  # [:40]: int() of thousands of digits is slow, and any 40 are past the range
        raise InputError(f"{label!r}: block size 0; a block holds at least 1 weight")
    return BLOCK_SIZE.parse(text, f"{label!r}: the block size")
