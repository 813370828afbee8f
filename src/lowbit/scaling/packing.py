"""Pack k-bit codes into bytes, first element in the most significant bits.

For k = 4 this is bitsandbytes' order (first element in the HIGH nibble, docs/formats.md#packing-of-codes).
GGUF formats pack their own bytes (split-half nibbles) in ``lowbit.gguf``.
"""

from __future__ import annotations

import torch


def packed_size(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int, pad_code: int = 0) -> torch.Tensor:
    """codes: (n,) integer tensor with values < 2**bits -> (ceil(n*bits/8),) uint8.

    Unused bits of the last byte hold ``pad_code`` (bitsandbytes pads with the code of 0.0).
    """
    n = codes.numel()
    if bits == 8:
        return codes.to(torch.uint8).reshape(-1)
    if bits == 4:  # the hot path: two codes per byte
        c = codes.to(torch.uint8).reshape(-1)
        if n % 2:
            c = torch.nn.functional.pad(c, (0, 1), value=pad_code)
        c = c.view(-1, 2)
        return (c[:, 0] << 4) | c[:, 1]
    # General k: 8 codes make k whole bytes; build a 64-bit word MSB-first, then split it.
    pad = (-n) % 8
    c = codes.to(torch.int64).reshape(-1)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad), value=pad_code)
    c = c.view(-1, 8)
    shifts = torch.arange(7, -1, -1, dtype=torch.int64) * bits  # (8,)
    word = (c << shifts).sum(dim=1)  # (groups,) holds 8*bits bits
    byte_shifts = torch.arange(bits - 1, -1, -1, dtype=torch.int64) * 8  # (bits,)
    out = ((word[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return out[: packed_size(n, bits)]


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_codes: (n,) uint8 codes."""
    if bits == 8:
        return packed.reshape(-1)[:n]
    if bits == 4:
        p = packed.reshape(-1)
        return torch.stack((p >> 4, p & 0xF), dim=1).reshape(-1)[:n]
    p = packed.reshape(-1).to(torch.int64)
    pad = (-p.numel()) % bits
    if pad:
        p = torch.nn.functional.pad(p, (0, pad))
    p = p.view(-1, bits)
    byte_shifts = torch.arange(bits - 1, -1, -1, dtype=torch.int64) * 8
    word = (p << byte_shifts).sum(dim=1)
    shifts = torch.arange(7, -1, -1, dtype=torch.int64) * bits
    codes = (word[:, None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:n].to(torch.uint8)
