"""The registered formats: name -> FormatSpec (facts from ``formats.table``), and family -> Codec.

Neither looking a format up (``formats.catalog`` registers every format) nor asking for its codec
imports torch, so that `lowbit formats` and `lowbit bits` start in a fraction of a second: the codec
modules import torch in the functions that compute, and build no tensor at import."""

from __future__ import annotations

import difflib
from importlib import import_module
from typing import TYPE_CHECKING, ClassVar

from ..errors import InputError

if TYPE_CHECKING:
    import torch

    from .spec import Anatomy, FormatSpec  # spec imports this module (``anatomy`` reads codec_for)

_FORMATS: dict[str, FormatSpec] = {}
_IDS: dict[int, str] = {}


class Codec:
    """Quantizes and dequantizes the blocks of every format of one family.

    Subclasses register by family name. Shared code (``lowbit.quantize``) flattens,
    checks and splits the input into blocks; a codec sees only a 2-D float32 tensor
    ``(n_blocks, block_size)`` and returns the named tensors it stores. Formats whose
    elements are levels on a grid subclass ``GridCodec``, which splits this work in three
    (choose_scales, encode, decode); GGUF blocks, whose scales come from their own search,
    implement ``quantize_blocks`` / ``dequantize_blocks`` directly.
    """

    family: ClassVar[str]
    registry: ClassVar[dict[str, type[Codec]]] = {}
    # What the family stores, in a few words: what ``require_grid`` says a format is instead of a grid.
    KIND: ClassVar[str] = "levels on a grid, scaled per block"
    # What the family stores and how an element decodes, in words: a template ``formats.spec.anatomy``
    # fills in for each format (`lowbit formats LABEL`, the errors of a label that does not apply).
    ANATOMY: ClassVar[Anatomy]

    def __init_subclass__(cls, family: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if family is None:  # an abstract base (GridCodec)
            return
        if family in Codec.registry:
            raise RuntimeError(f"codec family {family!r} registered twice")
        cls.family = family
        Codec.registry[family] = cls

    @classmethod
    def anatomy_for(cls, spec: FormatSpec) -> Anatomy:
        """``spec``'s Anatomy template: the family's, where its formats store alike."""
        return cls.ANATOMY

    @classmethod
    def tensor_parts(cls, spec: FormatSpec, flat: torch.Tensor, block: int) -> dict[str, torch.Tensor]:
        """Per-tensor constants computed before blocking (names start with ``tensor_``)."""
        return {}

    @classmethod
    def quantize_blocks(
        cls, spec: FormatSpec, blocks: torch.Tensor, *, partial: bool, tensor_parts: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """blocks: (n_blocks, block) float32 -> named parts: ``codes`` (n_blocks, block) uint8
        element codes, and per-block tensors on dim 0 (``scales``: fp32 when double quant may
        compress them). ``partial`` marks the trailing short block."""
        raise NotImplementedError

    @classmethod
    def dequantize_blocks(cls, spec: FormatSpec, parts: dict[str, torch.Tensor], n_blocks: int, block: int):
        """Inverse of quantize_blocks: (n_blocks, block) float32."""
        raise NotImplementedError

    # Overflow checks (lowbit.representable) read the stored scales, not the decoded tensor.
    @classmethod
    def peak(cls, spec: FormatSpec, parts: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """(n_blocks,) float32 largest decoded |value| per block (or a bound never below it that
        is finite exactly when the decode is); None: the caller decodes in full instead."""
        return None

    @classmethod
    def peak_max(cls, spec: FormatSpec, parts: dict[str, torch.Tensor]) -> torch.Tensor | float | None:
        """The largest of ``peak`` in one pass over the scales, where cheaper; None: use ``peak``."""
        return None


class GridCodec(Codec):
    """A family whose elements are levels on a grid, scaled per block: three pure functions.

    - ``choose_scales(spec, blocks, tensor_parts, ratio)``: the per-block scale parts. The
      default rule is the format's own (absmax, min/max, absmean...); ``ratio``, a
      ``(n_blocks,)`` clipping ratio, shrinks or stretches the range the rule sees (1 = the
      rule itself). This is the step a scale search (``lowbit.search``) replaces.
    - ``encode(spec, blocks, scales)``: codes, nearest level under the format's tie rule.
    - ``decode(spec, codes, scales)``: values.

    ``scales`` passed to encode/decode holds the per-block parts and the per-tensor ones.
    ``LINEAR_SCALE``: decode is ``level[code] * scales["scales"]``, so a least-squares
    refit of that one fp32 scale is meaningful (``lowbit.search.mse_search(refit=True)``).
    """

    SCALE_PARTS: ClassVar[tuple[str, ...]] = ("scales",)
    LINEAR_SCALE: ClassVar[bool] = True

    @classmethod
    def choose_scales(cls, spec, blocks, tensor_parts, ratio=None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def encode(cls, spec, blocks, scales, *, partial: bool = False) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def decode(cls, spec, codes, scales) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def table_form(cls, spec, parts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """``(table, factor, zero)`` such that decode is ``(table[code] - zero[b]) * factor[b]``
        with those float32 operations (``zero`` None: ``table[code] * factor[b]``), for the
        fused kernels (lowbit.kernels.linear), which then decode exactly as ``decode`` does
        (tests/formats/test_registry.py); None where decode is not of that form."""
        return None

    @classmethod
    def quantize_blocks(cls, spec, blocks, *, partial, tensor_parts):
        scales = cls.choose_scales(spec, blocks, tensor_parts)
        return {"codes": cls.encode(spec, blocks, {**tensor_parts, **scales}, partial=partial), **scales}

    @classmethod
    def dequantize_blocks(cls, spec, parts, n_blocks, block):
        return cls.decode(spec, parts["codes"].view(n_blocks, block), parts)

    @classmethod
    def surrogate(cls, spec, blocks, codes, scales) -> torch.Tensor:
        """A differentiable stand-in for ``decode(encode(blocks))`` (``lowbit.fake_quant``):
        its value is the decoded blocks up to rounding, its gradient the straight-through
        estimator (LSQ, Esser et al. 2020, arXiv 1902.08153, eq. 3): d/dx = 1 inside the
        grid's range, 0 outside; d/dscale = level - x/scale inside, level outside.

        This default serves every grid whose decode is ``level[code] * multiplier`` with a
        multiplier differentiable in the scale parts (``multiplier``); int_asym overrides it.
        """
        import torch

        levels, lo, hi = cls.levels(spec, scales)
        m = cls.multiplier(spec, scales)[:, None]
        y = blocks / m
        yc = y.clamp(lo, hi)
        return (levels[codes.to(torch.int64)] + (yc - yc.detach())) * m

    @classmethod
    def levels(cls, spec, scales) -> tuple[torch.Tensor, float, float]:
        """(level of each code, lowest level, highest finite level) before the multiplier."""
        import torch

        values = torch.tensor(spec.values, dtype=torch.float32)
        finite = values[values.isfinite()]
        return values, float(finite.min()), float(finite.max())

    @classmethod
    def search_levels(cls, spec, tensor_parts) -> torch.Tensor:
        """Sorted finite levels in units of the ``scales`` part (LINEAR_SCALE formats): what a
        fast scale search (``dispatch`` op "search") rounds to."""
        import torch

        values = torch.tensor(spec.values, dtype=torch.float32)
        return values[values.isfinite()].sort().values

    @classmethod
    def multiplier(cls, spec, scales) -> torch.Tensor:
        """(n_blocks,) the factor decode multiplies each level by."""
        return scales["scales"]


def require_grid(spec: FormatSpec, why: str) -> type[GridCodec]:
    """``spec``'s codec, where its elements are levels on a grid; else an InputError: ``why`` (what
    needs the grid, and which formats have one), then what ``spec`` is instead."""
    codec = codec_for(spec)
    if not issubclass(codec, GridCodec):
        raise InputError(f"{why}; {spec.name} is {codec.KIND}")
    return codec


def register(spec: FormatSpec) -> FormatSpec:
    for key in (spec.name, *spec.aliases):
        if key in _FORMATS:
            raise RuntimeError(f"format {key!r} registered twice")
    if spec.id in _IDS:
        raise RuntimeError(f"format id {spec.id} used by {_IDS[spec.id]!r} and {spec.name!r}")
    for key in (spec.name, *spec.aliases):
        _FORMATS[key] = spec
    _IDS[spec.id] = spec.name
    return spec


# formats.catalog registers every format on the first lookup (no torch); the codec modules, which
# register their families by importing, on the first codec asked for.
_CODEC_MODULES = ("cast", "codebooks", "int", "learned", "minifloat", "mx", "ternary", "lowbit.gguf")
_loaded: set[str] = set()


def _load(*modules: str) -> None:
    for name in modules:
        if name not in _loaded:
            _loaded.add(name)  # first: a module being imported may look a format up
            import_module(name if name.startswith("lowbit.") else f"{__package__}.{name}")


def _register_all() -> None:
    _load("catalog")


def formats() -> list[str]:
    """Names of every registered format, in id order."""
    _register_all()
    return [_IDS[i] for i in sorted(_IDS)]


def get_format(name: str | FormatSpec) -> FormatSpec:
    if not isinstance(name, str):  # a FormatSpec already
        return name
    _register_all()
    key = str(name).strip().lower().replace("-", "_")
    if key in _FORMATS:
        return _FORMATS[key]
    close = difflib.get_close_matches(key, list(_FORMATS), n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise InputError(f"unknown format {name!r}{hint} (run `lowbit formats` for the list)")


def format_by_id(format_id: int) -> FormatSpec:
    _register_all()
    if format_id not in _IDS:
        raise InputError(f"unknown format id {format_id}")
    return _FORMATS[_IDS[format_id]]


def codec_for(spec: FormatSpec) -> type[Codec]:
    _register_all()
    _load(*_CODEC_MODULES)
    return Codec.registry[spec.family]
