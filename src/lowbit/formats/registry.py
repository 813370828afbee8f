"""The one table of formats: name -> FormatSpec, and family -> Codec."""

from __future__ import annotations

import difflib
from typing import ClassVar

import torch

from .spec import FormatSpec

_FORMATS: dict[str, FormatSpec] = {}
_IDS: dict[int, str] = {}


class Codec:
    """Encodes and decodes the blocks of every format of one family.

    Subclasses register by family name. Shared code (``lowbit.quantize``) flattens,
    checks and splits the input into blocks; a codec sees only a 2-D float32 tensor
    ``(n_blocks, block_size)`` and returns the named tensors it stores.
    """

    family: ClassVar[str]
    registry: ClassVar[dict[str, type[Codec]]] = {}

    def __init_subclass__(cls, family: str, **kwargs):
        super().__init_subclass__(**kwargs)
        if family in Codec.registry:
            raise RuntimeError(f"codec family {family!r} registered twice")
        cls.family = family
        Codec.registry[family] = cls

    @classmethod
    def tensor_parts(cls, spec: FormatSpec, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-tensor constants computed before blocking (names start with ``tensor_``)."""
        return {}

    @classmethod
    def encode(
        cls, spec: FormatSpec, blocks: torch.Tensor, *, partial: bool, tensor_parts: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """blocks: (n_blocks, block) float32 -> named parts: ``codes`` (n_blocks, block) uint8
        element codes, and per-block tensors on dim 0 (``scales``: fp32 when double quant may
        compress them). ``partial`` marks the trailing short block."""
        raise NotImplementedError

    @classmethod
    def decode(cls, spec: FormatSpec, parts: dict[str, torch.Tensor], n_blocks: int, block: int) -> torch.Tensor:
        """Inverse of encode: (n_blocks, block) float32."""
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

    # Optional fast kernels (lowbit.kernels): the whole flat tensor at once, stored parts
    # already packed. Return None to use the reference path. Must give identical results.
    @classmethod
    def fast_encode(cls, spec: FormatSpec, flat: torch.Tensor, block: int) -> dict[str, torch.Tensor] | None:
        return None

    @classmethod
    def fast_decode(cls, spec: FormatSpec, parts: dict[str, torch.Tensor], n: int, block: int) -> torch.Tensor | None:
        return None


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


def formats() -> list[str]:
    """Names of every registered format, in id order."""
    return [_IDS[i] for i in sorted(_IDS)]


def get_format(name: str | FormatSpec) -> FormatSpec:
    if isinstance(name, FormatSpec):
        return name
    key = str(name).strip().lower().replace("-", "_")
    if key in _FORMATS:
        return _FORMATS[key]
    close = difflib.get_close_matches(key, list(_FORMATS), n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown format {name!r}{hint} (run `lowbit formats` for the list)")


def format_by_id(format_id: int) -> FormatSpec:
    if format_id not in _IDS:
        raise ValueError(f"unknown format id {format_id}")
    return _FORMATS[_IDS[format_id]]


def codec_for(spec: FormatSpec) -> type[Codec]:
    return Codec.registry[spec.family]
