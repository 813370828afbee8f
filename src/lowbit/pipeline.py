"""The grid pipeline over a flat tensor: choose scales, encode, decode (docs/formats.md#scale-search).

``lowbit.quantize`` flattens and checks the input; here it is cut into full blocks and
one trailing partial block (which gets its own scale), and each piece goes through its
codec: ``choose_scales`` (the format's rule, or a search from ``lowbit.search``), then
``encode``. GGUF codecs run their own search inside ``quantize_blocks``. ``encode_parts``
packs the codes, or runs a registered kernel where one applies.
"""

from __future__ import annotations

import torch

from . import dispatch
from . import kernels as _kernels  # noqa: F401  (registers the fast paths that dispatch looks up)
from .errors import InputError
from .formats.registry import Codec, codec_for, require_grid
from .formats.spec import FormatSpec
from .scaling.blocks import split_blocks
from .scaling.packing import pack_codes
from .search import HQQ, SEARCHES, WEIGHTED, hqq_search, mse_search  # names: docs/formats.md#scale-search

# The fast path's ratio scan: 1.0 (the format's rule) first, then 1.1 down to 0.3 in steps of 0.025,
# then +-0.0125 around each block's best (lowbit.search.COARSE_RATIOS explains the range).
KERNEL_RATIOS = (1.0, *(round(1.1 - 0.025 * i, 4) for i in range(33) if i != 4))
KERNEL_STEPS = (0.0, -0.0125, 0.0125)


def check_search(spec: FormatSpec, search: str) -> str:
    """``search`` normalized; a one-line ValueError for an unknown name or a format it cannot serve."""
    key = search.strip().lower()
    if key not in SEARCHES:
        raise InputError(f"unknown scale search {search!r}: use one of {', '.join(SEARCHES)} "
                         "(mse/amse: clipping grid search, plain or activation-weighted; hqq/ahqq: half-quadratic)")
    codec = require_grid(spec, f"@{key} needs a format whose elements are levels on a grid, such as nf4, int4, "
                               "int4_asym, fp4_e2m1, mxfp4 or qq4")
    if key in HQQ and "zeros" not in codec.SCALE_PARTS:
        raise InputError(f"@{key} optimizes a zero point, and {spec.name} has none: use a zero-point format "
                         f"such as int{spec.bits}_asym, or @mse for {spec.name}")
    return key


def needs_calibration(search: str | None) -> bool:
    return bool(search) and search.strip().lower() in WEIGHTED


def quantize_flat(spec: FormatSpec, flat: torch.Tensor, block: int, *, search: str | None = None,
                  weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """(n,) float32 -> the stored parts with ``codes`` unpacked (flat uint8), per-block parts on dim 0.

    ``weights``: None or (n,) nonnegative importance of each element, for the weighted searches.
    """
    codec = codec_for(spec)
    tensor_parts = codec.tensor_parts(spec, flat, block)
    pieces = []
    w_head, w_tail = split_blocks(weights, block) if weights is not None else (None, None)
    for blocks, w, partial in zip(split_blocks(flat, block), (w_head, w_tail), (False, True), strict=True):
        if blocks is None:
            continue
        if search is None or not blocks.shape[0]:
            pieces.append(codec.quantize_blocks(spec, blocks, partial=partial, tensor_parts=tensor_parts))
        else:
            scales = searched_scales(codec, spec, blocks, tensor_parts, search, w, partial)
            pieces.append({"codes": codec.encode(spec, blocks, {**tensor_parts, **scales}, partial=partial), **scales})
    parts = dict(tensor_parts)
    for name in pieces[0]:
        # codes are per element, so flat; every other part is per block, on dim 0
        ts = [p[name].reshape(-1) if name == "codes" else p[name] for p in pieces]
        parts[name] = ts[0] if len(ts) == 1 else torch.cat(ts)
    return parts


def encode_parts(spec: FormatSpec, flat: torch.Tensor, block: int, *, search: str | None = None,
                 weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """(n,) float32, n > 0 -> the stored parts, codes packed: a registered kernel where one applies."""
    fast = dispatch.lookup("quantize", codec_for(spec).family) if search is None else None
    parts = fast(spec, flat, block) if fast is not None else None
    if parts is None:
        parts = quantize_flat(spec, flat, block, search=search, weights=weights)
        if "codes" in parts:
            parts["codes"] = pack_codes(parts["codes"], spec.bits, pad_code=zero_code(spec))
    return parts


def zero_code(spec: FormatSpec) -> int:
    """Code of +0.0 where the format has one: what bitsandbytes writes into a padding nibble."""
    values = spec.values or ()
    return next((i for i, v in enumerate(values) if v == 0.0), 0)


def searched_scales(codec: type[Codec], spec: FormatSpec, blocks: torch.Tensor, tensor_parts: dict, search: str,
                    weights: torch.Tensor | None, partial: bool) -> dict[str, torch.Tensor]:
    """The per-block scale parts that ``search`` picks for ``blocks`` (n_blocks, block)."""
    w = weights if search in WEIGHTED else None
    if search in HQQ:  # a float zero, stored as float16 as hqq stores it (docs/formats.md#zero-point-integers)
        scale, zero = hqq_search(blocks, bits=spec.bits, weights=w)
        return {"scales": scale, "zeros": zero.to(torch.float16)}
    if search == "mse":
        # Each weight's error weighed by its square, llama.cpp's rule without an importance matrix (make_qx_quants
        # rmse_type 1, quantize_row_iq4_nl_impl): plain MSE clips the largest weights, and on the embedded
        # SmolLM2 nf4 lost mean KL 0.270 with it against 0.236 weighed by x^2 (bitsandbytes nf4: 0.259).
        w = blocks.square()

    def propose(ratio):
        return codec.choose_scales(spec, blocks, tensor_parts, ratio)

    def roundtrip(scales):
        full = {**tensor_parts, **scales}
        return codec.decode(spec, codec.encode(spec, blocks, full, partial=partial), full)

    fast = dispatch.lookup("search", codec.family) if codec.LINEAR_SCALE else None
    start = None
    if fast is not None:  # the ratio scan in one C pass; the refits below stay on the reference codec
        base = codec.choose_scales(spec, blocks, tensor_parts)["scales"]
        levels = codec.search_levels(spec, tensor_parts)
        coarse = torch.tensor(KERNEL_RATIOS)
        centre = coarse[fast(blocks, w, base, coarse, levels)]
        fine = torch.tensor(KERNEL_STEPS)
        start = centre + fine[fast(blocks, w, base, fine, levels, centre=centre)]
    return mse_search(blocks, propose=propose, roundtrip=roundtrip, weights=w, refit=codec.LINEAR_SCALE, start=start)
