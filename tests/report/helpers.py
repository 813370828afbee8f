"""What the report tests share: result dicts shaped as the commands write them, and the checks every figure
passes (a title, labelled axes, a legend, a PNG that decodes)."""

import io

import pytest

from lowbit.report.figure import png_bytes

MODEL = {"name": "SmolLM2-135M-Instruct", "source": "embedded"}


# rows of a real `lowbit compare --json` of the embedded SmolLM2 (default formats, trimmed), then made-up rows: a
# keep row, a plan, a failed format and an exact one
COMPARE = {
    "lowbit_version": "0.1.0", "model": MODEL, "protocol": {"kind": "causal-lm"}, "reference": {"ppl": 14.0},
    "results": [
        {"format": "int8", "block_size": 64, "bits_per_weight": 8.5, "layer_formats": {"int8": 210},
         "kl_mean": 0.0014250922064771095, "top1": 0.9779843444227005},
        {"format": "q8_0", "block_size": 32, "bits_per_weight": 8.5, "layer_formats": {"q8_0": 210},
         "kl_mean": 0.0011839096326301593, "top1": 0.9801859099804305},
        {"format": "nf4", "block_size": 64, "bits_per_weight": 4.5, "layer_formats": {"nf4": 210},
         "kl_mean": 0.25875875156755035, "top1": 0.7366682974559687},
        {"format": "nf4+dq", "block_size": 64, "bits_per_weight": 4.127034505208333,
         "layer_formats": {"nf4+dq": 210}, "kl_mean": 0.2603229351132273, "top1": 0.7364236790606654},
        {"format": "int4", "block_size": 64, "bits_per_weight": 4.5, "layer_formats": {"int4": 210},
         "kl_mean": 0.5129899658193576, "top1": 0.6420009784735812},
        {"format": "keep bfloat16", "bits_per_weight": 32.0, "kl_mean": 0.00031, "top1": 0.99},
        {"format": "budget 4.5", "bits_per_weight": 4.494, "kl_mean": 0.0281, "top1": 0.9086,
         "layer_formats": {"nf4/32+dq+gptq@amse": 150, "nf5/64+dq+gptq@amse": 50, "int8/64+dq": 10}},
        {"format": "q4_k", "error": "layer 'x' (weight 576x1536): q4_k needs whole blocks of 256"},
        {"format": "exact", "bits_per_weight": 32.0, "kl_mean": 0.0, "top1": 1.0},
    ],
}


# benchmarks/bench_quality.py --json: peer rows, lowbit rows and llama.cpp's fixed rows
BENCH = {
    "model": MODEL, "protocol": {"kind": "causal-lm"}, "reference": {}, "skipped": {},
    "rows": [{"format": "bitsandbytes nf4/64", "peer": True, "bits_per_weight": 4.5, "kl_mean": 0.2588},
             {"format": "gguf q4_0", "peer": True, "bits_per_weight": 4.5, "kl_mean": 0.268},
             {"format": "hqq 4-bit/64", "peer": True, "bits_per_weight": 4.5, "kl_mean": 0.204},
             {"format": "nf4/32+dq+gptq@amse", "bits_per_weight": 4.254, "kl_mean": 0.0594}],
    "llama_cpp": [{"format": "Q4_K_M imatrix (llama.cpp, measured separately, see README)", "bits_per_weight": 5.53,
                   "kl_mean": 0.027, "top1": None}],
}


ENCODER = {"model": {"name": "all-MiniLM-L6-v2"}, "protocol": {"kind": "encoder"}, "results": [
    {"format": "nf4", "bits_per_weight": 4.5, "cos_dist_mean": 0.0298, "cos_dist_max": 0.1},
    {"format": "int8", "bits_per_weight": 8.5, "cos_dist_mean": 0.0004, "cos_dist_max": 0.002}]}


def errors_report(blocks: int = 2) -> dict:
    kinds = ("self_attn.q_proj", "mlp.down_proj")
    layers = [{"name": f"model.layers.{b}.{k}", "shape": [64, 64]} for b in range(blocks) for k in kinds]

    def fmt(label, bits, base):
        per = [{"mse": 1e-6, "sqnr_db": base + i % 3, "max_abs": 0.01, "rel_frobenius": 0.1}
               for i in range(len(layers))]
        per[-1]["sqnr_db"] = None  # inf (exact) is written as null
        finite = [e["sqnr_db"] for e in per if e["sqnr_db"] is not None]
        return {"format": label, "bits_per_weight": bits, "mean_sqnr_db": sum(finite) / len(finite),
                "min_sqnr_db": min(finite), "min_layer": layers[0]["name"], "gaussian_bound_db": 6.02 * bits,
                "layers": per}

    return {"lowbit_version": "0.1.0", "model": MODEL, "layers": layers,
            "formats": [fmt("nf4", 4.5, 20.0), fmt("int8", 8.5, 40.0), {"format": "q4_k", "error": "whole blocks"}]}


OUTLIERS = {
    "model": MODEL, "text": {"calibrate": 2, "window": 512}, "threshold": 6.0, "hidden_size": 64, "blocks": 2,
    "criteria": {"layer_share": 0.25, "position_share": 0.06},
    "hidden_inputs": ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"],
    "layers": [
        {"name": "model.layers.0.self_attn.q_proj", "in_features": 64, "block": 0, "positions": 100,
         "shares_input_with": None, "dims": [{"dim": 3, "positions": 40, "share": 0.4, "max_abs": 30.0},
                                             {"dim": 9, "positions": 1, "share": 0.01, "max_abs": 6.5}]},
        {"name": "model.layers.0.self_attn.k_proj", "in_features": 64, "block": 0, "positions": 100,
         "shares_input_with": "model.layers.0.self_attn.q_proj",
         "dims": [{"dim": 3, "positions": 40, "share": 0.4, "max_abs": 30.0}]},
        {"name": "model.layers.0.mlp.down_proj", "in_features": 128, "block": 0, "positions": 100,
         "shares_input_with": None, "dims": [{"dim": 3, "positions": 2, "share": 0.02, "max_abs": 7.0}]},
        {"name": "model.layers.1.self_attn.q_proj", "in_features": 64, "block": 1, "positions": 100,
         "shares_input_with": None, "dims": [{"dim": 3, "positions": 50, "share": 0.5, "max_abs": 40.0}]},
    ],
    "features": [{"dim": 3, "layers": 2, "layer_share": 1.0, "position_share": 0.45, "max_abs": 40.0,
                  "systematic": True},
                 {"dim": 9, "layers": 1, "layer_share": 0.5, "position_share": 0.005, "max_abs": 6.5,
                  "systematic": False}],
    "systematic": [3],
}


PLAN = {"name": "budget 4.5", "rules": [{"pattern": "lm_head", "keep": True}] + [
    {"pattern": f"model.layers.{b}.{k}", "format": label}
    for b in range(2) for k, label in (("self_attn.q_proj", "nf4/32+dq"), ("mlp.down_proj", "int8/64+dq"))]}


def check(fig, *, legend: bool = True) -> bytes:
    """Title, labelled axes with a unit or scale, a legend; the PNG decodes."""
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert any(ax.get_title() for ax in axes)
    assert any(ax.get_xlabel() for ax in axes) and any(ax.get_ylabel() for ax in axes)
    if legend:
        assert fig.legends or any(ax.get_legend() is not None for ax in axes)
    png = png_bytes(fig)
    image = pytest.importorskip("matplotlib.image").imread(io.BytesIO(png), format="png")
    assert image.shape[0] > 200 and image.shape[1] > 200
    return png


def legend_texts(fig) -> str:
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    return "\n".join(t.get_text() for legend in legends for t in legend.get_texts())


def tail_row(label, bits, kl, tokens=1000):
    levels = [0.0, 0.5, 0.99, 0.999, 1.0]
    return {"format": label, "bits_per_weight": bits, "kl_mean": kl, "tokens": tokens,
            "kl_quantiles": {"q": levels, "kl": [0.0, kl, 4 * kl, 8 * kl, 15 * kl]},
            "layer_sqnr": {"layers": ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"],
                           "sqnr_db": [6 * bits - 6, None]}}
