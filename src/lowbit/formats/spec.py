"""FormatSpec: the frozen facts of one number format."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FormatSpec:
    """One registered format.

    ``id`` is written into saved files and never changes meaning. ``family`` names the
    codec that encodes and decodes it; ``params`` holds family-specific frozen settings.
    """

    name: str
    id: int
    family: str
    bits: int  # bits per element code, scales not counted
    default_block_size: int
    values: tuple[float, ...] | None = None  # representable values in code order
    params: tuple[tuple[str, object], ...] = ()
    fixed_block_size: bool = False  # GGUF and MX fix the block; others take any size
    row_blocks: bool = False  # GGUF: every row (last dim) must hold whole blocks
    double_quant: bool = False  # per-block fp32 scale that bnb-style double quant can compress
    description: str = ""
    aliases: tuple[str, ...] = field(default=())

    def param(self, key: str):
        return dict(self.params)[key]

    def __repr__(self) -> str:
        return f"FormatSpec({self.name!r}, bits={self.bits}, block={self.default_block_size})"
