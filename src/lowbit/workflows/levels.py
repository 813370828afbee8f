"""A layer's weight histogram and, per format, the levels of one block: the data ``report.plots.layer_levels``
draws, computed here (the weight is quantized) so that the report only draws it.

Taken from a weight tensor (``lowbit plot levels`` finds it in the model), never from a model itself.
"""

from __future__ import annotations

import math

from ..errors import InputError


def level_config(label: str):
    """``label``'s QuantConfig, if a weight can be rounded to it on its own (no calibration inputs)."""
    from ..formats import get_format
    from ..planning.config import QuantConfig

    config = QuantConfig.parse(label)
    spec = get_format(config.format)
    if spec.bits > 8:
        raise InputError(f"{label}: {spec.description}: its {2**spec.bits} levels are too many to draw")
    if config.methods or config.needs_calibration:
        raise InputError(f"{label}: the levels plot rounds the weight on its own; methods "
                         f"({', '.join(config.methods) or 'none here'}) and activation-weighted searches (@amse, "
                         "@ahqq) need the model or its inputs")
    return config


def block_levels(weight, label: str) -> dict:
    """``weight`` quantized to ``label``; of its blocks the one with the median absmax, and that block's levels
    (every code decoded with the block's own scale parts, as the format decodes it; sorted, distinct)."""
    import torch

    from ..layers.surgery import quantize_weight

    config = level_config(label)
    weight = weight.detach().to(torch.float32)
    q = quantize_weight(weight, config)
    flat, block = weight.reshape(-1), q.block_size
    n_full = flat.numel() // block
    if n_full:
        absmax = flat[: n_full * block].view(n_full, block).abs().amax(1)
        b = int(absmax.argsort()[n_full // 2])
    else:
        b = 0
    values = flat[b * block: (b + 1) * block]
    # a GGUF block: its bytes with the code fields rewritten; a grid format: every code with the block's scales
    levels = _gguf_levels(q, b, values) if "data" in q.parts else _grid_levels(q, b)
    levels = sorted({v for v in levels if math.isfinite(v)})
    return {"label": config.label, "format": q.format.name, "bits_per_weight": q.bits_per_weight,
            "block_size": block, "block": b, "absmax": float(values.abs().max()), "levels": levels}


def _grid_levels(q, b: int) -> list[float]:
    import torch

    from ..formats.registry import codec_for
    from ..scaling import double_quant

    parts = dict(q.parts)
    if q.double_quant:
        parts["scales"] = double_quant.decompress(parts)
    n = len(q.format.values) if q.format.values is not None else 2**q.format.bits  # narrow ints store fewer
    scales = {k: (t if k.startswith("tensor_") else t[b: b + 1]) for k, t in parts.items() if k != "codes"}
    codes = torch.arange(n, dtype=torch.uint8).view(1, n)
    return codec_for(q.format).decode(q.format, codes, scales).reshape(-1).tolist()


def _gguf_levels(q, b: int, values) -> list[float]:
    """Each code decoded by the format's own decoder from this block with every element's code set to it; in a
    k-quant block the sub-blocks decode differently: the sub-block with the median absmax is taken."""
    import torch

    from ..formats.spec import CODES, anatomy
    from ..tensor import QuantizedTensor

    raw = q.parts["data"][b].clone()
    decoded = []
    for code in range(2**q.format.bits):
        at = 0
        for f in anatomy(q.format).fields:
            if f.role == CODES:
                raw[at: at + f.nbytes] = torch.frombuffer(bytearray(f.probe_bytes(code)), dtype=torch.uint8)
            at += f.nbytes
        one = QuantizedTensor(q.format, torch.Size([q.block_size]), torch.float32, q.block_size,
                              {"data": raw.view(1, -1).clone()})
        decoded.append(one.dequantize())
    table = torch.stack(decoded)  # (codes, elements of the block)
    groups: dict[tuple, list[int]] = {}
    for j in range(table.shape[1]):
        groups.setdefault(tuple(table[:, j].tolist()), []).append(j)
    ranked = sorted(groups, key=lambda g: float(values[groups[g]].abs().max()))
    return list(ranked[len(ranked) // 2])


def layer_levels_data(weight, labels: list[str], layer: str = "", bins: int = 160) -> dict:
    """What ``plots.layer_levels`` draws: the layer's weight histogram (density per unit weight, over the range
    the levels span, with the share of weights outside it) and ``block_levels`` for each label."""
    import torch

    formats = [block_levels(weight, label) for label in labels]
    w = weight.detach().to(torch.float32).reshape(-1)
    reach = max([abs(v) for f in formats for v in f["levels"]] + [f["absmax"] for f in formats])
    reach = 1.15 * (reach or float(w.abs().max()) or 1.0)
    counts = torch.histc(w, bins=bins, min=-reach, max=reach)
    width = 2 * reach / bins
    return {"layer": layer, "shape": list(weight.shape), "range": [-reach, reach],
            "edges": torch.linspace(-reach, reach, bins + 1).tolist(),
            "density": (counts / (w.numel() * width)).tolist(),
            "outside": float((w.abs() > reach).double().mean()), "formats": formats}
