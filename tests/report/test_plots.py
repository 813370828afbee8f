"""lowbit.report.plots and plot_data: every figure from small result dicts shaped as the commands write them."""

import io
import json
import math
import subprocess
import sys
from itertools import pairwise

import pytest
import torch

from lowbit.errors import InputError
from lowbit.formats import get_format
from lowbit.formats.codebooks import NF_DELTA
from lowbit.report import plot_data as pd
from lowbit.report import plots, result_json
from lowbit.workflows import levels

matplotlib_image = pytest.importorskip("matplotlib.image")

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
    png = plots.png_bytes(fig)
    image = matplotlib_image.imread(io.BytesIO(png), format="png")
    assert image.shape[0] > 200 and image.shape[1] > 200
    return png


def legend_texts(fig) -> str:
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    return "\n".join(t.get_text() for legend in legends for t in legend.get_texts())


def test_importing_lowbit_does_not_load_matplotlib():
    code = ("import sys, lowbit.cli, lowbit.report.plots, lowbit.report.plot_data, lowbit.commands.plot_cmd; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_kl_vs_bits_points_front_and_notes():
    fig = plots.kl_vs_bits(COMPARE)
    check(fig)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and "nats" in ax.get_ylabel() and "bits per weight" in ax.get_xlabel()
    labels = {t.get_text() for t in ax.texts}
    assert {"int8", "q8_0", "nf4", "nf4+dq", "int4", "budget 4.5"} <= labels
    assert "q4_k" not in labels and "exact" not in labels and "keep bfloat16" not in labels
    text = legend_texts(fig)
    assert "not shown: q4_k: not scored" in text and "exact" in text and "keep bfloat16" in text


def test_pareto_front_is_the_lowest_kl_for_at_most_those_bits():
    pts, _ = pd.points([r for r in COMPARE["results"] if not pd.is_keep_row(r)], "kl_mean", group="lowbit")
    front = pd.pareto_front(pts)
    assert [p.label for p in front] == ["nf4+dq", "budget 4.5", "q8_0"]
    assert all(a.bits < b.bits and a.value > b.value for a, b in pairwise(front))


def test_kl_vs_bits_with_peers_and_a_bench_report():
    fig = plots.kl_vs_bits(COMPARE, peers=BENCH)
    check(fig)
    text = legend_texts(fig)
    assert "bitsandbytes (peer)" in text and "hqq (peer)" in text and "llama.cpp (peer, measured separately)" in text
    labels = {t.get_text() for t in fig.axes[0].texts}
    assert "llama.cpp Q4_K_M imatrix" in labels and "bitsandbytes nf4/64" in labels
    # a bench report alone: its lowbit rows as points, its peers as peers
    fig = plots.kl_vs_bits(BENCH)
    assert "nf4/32+dq+gptq@amse" in {t.get_text() for t in fig.axes[0].texts}
    assert "gguf-py (peer)" in legend_texts(fig)
    # peers as a list of a bench report's rows (as the HTML report passes them): its lowbit rows are not peers
    fig = plots.kl_vs_bits(COMPARE, peers=BENCH["rows"])
    assert "nf4/32+dq+gptq@amse" not in {t.get_text() for t in fig.axes[0].texts}
    assert "bitsandbytes (peer)" in legend_texts(fig)


def test_kl_vs_bits_of_an_encoder_plots_cosine_distance():
    fig = plots.kl_vs_bits(ENCODER)
    check(fig)
    assert "cosine" in fig.axes[0].get_ylabel() and "cosine" in fig.axes[0].get_title()


def test_kl_vs_bits_with_nothing_on_a_log_axis_is_an_error():
    with pytest.raises(ValueError, match="log axis"):
        plots.kl_vs_bits({"results": [{"format": "exact", "bits_per_weight": 32.0, "kl_mean": 0.0}]})


@pytest.mark.parametrize("blocks, grouped", [(2, False), (30, True)])
def test_sqnr_heatmap(blocks, grouped):
    report = errors_report(blocks)
    fig = plots.sqnr_heatmap(report)
    check(fig)
    grid = pd.sqnr_grid(report)
    assert grid.grouped == grouped and grid.formats[0].startswith("nf4\n4.50 b/w\nmean 2")
    assert math.isnan(grid.values[-1 if not grouped else 0][0]) or grouped
    colorbar = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert colorbar and "dB" in colorbar[0].get_ylabel()
    assert "q4_k: not measured" in legend_texts(fig) and "worst layer" in legend_texts(fig)
    if grouped:
        assert grid.rows[-2:] == ["mean (60 layers)", "worst layer"]
        assert grid.rows[0] == "model.layers.*.self_attn.q_proj (30)"
    else:
        assert grid.rows == [layer["name"] for layer in report["layers"]]
        assert {t.get_text() for t in fig.axes[0].texts} >= {"20.0", "41.0", "n/a"}


def test_plan_layers_of_a_plan_a_saved_model_and_a_compare_row():
    fig = plots.plan_layers(PLAN)
    check(fig)
    text = legend_texts(fig)
    assert "nf4/32+dq (2 layers)" in text and "budget: 4.5 bits per weight" in text and "lm_head" in text
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == pytest.approx([pd.label_bits("nf4/32+dq"), pd.label_bits("int8/64+dq")] * 2)
    assert 4.25 < heights[0] < 4.26 and 8.1 < heights[1] < 8.2  # codes + 8-bit scales (+dq) per block

    sensitivity = {"candidates": ["nf4/32+dq", "int8/64+dq"], "anchor": "nf4/32+dq", "windows": 2, "layers": [
        {"name": r["pattern"], "numel": 4096, "costs": {r["format"]: {"bytes": 2048, "error": 1.0, "kl": 0.1,
                                                                       "measured": True}}}
        for r in PLAN["rules"] if "format" in r]}
    bars = pd.plan_bars(PLAN, sensitivity)
    assert bars.exact and [b for _, _, b in bars.layers] == [4.0] * 4 and bars.mean_bits == 4.0

    saved = {"lowbit_layout": 1, "config": {"label": "budget 4.5"}, "quantize": {"bits_per_weight": 5.1},
             "layers": {"model.layers.0.mlp.down_proj": {"format": "nf4", "block_size": 32, "double_quant": True},
                        "model.layers.0.mlp.up_proj": {"format": "int8", "block_size": 64, "double_quant": False,
                                                       "label": "int8/64"}}}
    assert [lab for _, lab, _ in pd.plan_bars(saved).layers] == ["nf4/32+dq", "int8/64"]
    check(plots.plan_layers(saved))

    fig = plots.plan_layers(COMPARE)  # the report's one row that mixes formats
    check(fig)
    assert len(fig.axes[0].patches) == 210 and "nf5/64+dq+gptq@amse (50 layers)" in legend_texts(fig)
    assert "not which" in fig.axes[0].get_xlabel()
    assert len(plots.plan_layers(COMPARE, row="nf4").axes[0].patches) == 210


def test_plan_row_choice_errors():
    plan_row = next(r for r in COMPARE["results"] if r["format"] == "budget 4.5")
    two = {"results": [plan_row, dict(plan_row, format="budget 4.25")]}
    with pytest.raises(ValueError, match="2 rows mix formats: name one with --row"):
        pd.plan_bars(two)
    with pytest.raises(ValueError, match="no row 'nf9'"):
        pd.plan_bars(COMPARE, row="nf9")
    with pytest.raises(ValueError, match="no layer_formats"):
        pd.plan_bars(COMPARE, row="keep bfloat16")


def test_outlier_counts_marks_systematic_features():
    data = pd.outlier_bars(OUTLIERS)
    assert data.counts == [2, 1, 1, 1]
    assert data.systematic == [1, 1, 0, 1]  # the FFN contraction reads another width: dim 3 there is not it
    fig = plots.outlier_counts(OUTLIERS)
    check(fig)
    assert "systematic" in legend_texts(fig) and "dim 3" in legend_texts(fig)
    assert "count" in fig.axes[0].get_ylabel()


def test_layer_levels_figure():
    torch.manual_seed(0)
    data = levels.layer_levels_data(torch.randn(64, 256) * 0.02, ["int4", "nf4", "fp4_e2m1", "qq4"], layer="mlp.down")
    json.dumps(data)  # plain data, as the HTML report may store it
    assert sum(d * (data["edges"][1] - data["edges"][0]) for d in data["density"]) == pytest.approx(
        1 - data["outside"], abs=1e-3)
    fig = plots.layer_levels(data)
    check(fig)
    assert fig.axes[1].get_xlabel() == "weight value" and "per unit weight" in fig.axes[0].get_ylabel()
    assert "int4: 4.5 bits/weight, 15 levels" in legend_texts(fig)
    assert [t.get_text() for t in fig.axes[1].get_yticklabels()] == ["int4", "nf4", "fp4_e2m1", "qq4"]


def test_format_levels_with_the_normal_density():
    values = get_format("nf4").values
    fig = plots.format_levels({"nf4": values}, gaussian=True)
    check(fig)
    ax = fig.axes[0]
    curve = ax.lines[0]
    x, y = curve.get_xdata(), curve.get_ydata()
    assert sum(y[i] * (x[1] - x[0]) for i in range(len(x))) == pytest.approx(0.98, abs=0.03)  # a density
    assert f"{NF_DELTA:.2%}" in legend_texts(fig)
    check(plots.format_levels({"int4": get_format("int4").values, "fp4_e2m1": get_format("fp4_e2m1").values}))
    with pytest.raises(ValueError, match="learned"):
        plots.format_levels({"qq4": []})


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_save_figure_writes_the_suffix_format_atomically(tmp_path, suffix, magic):
    path = plots.save_figure(plots.format_levels({"int4": get_format("int4").values}), tmp_path / f"f{suffix}")
    assert path.read_bytes().startswith(magic)
    assert [p.name for p in tmp_path.iterdir()] == [f"f{suffix}"]  # no temp file left


def test_save_figure_refuses_an_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"\.png, \.svg, \.pdf"):
        plots.save_figure(plots.format_levels({"int4": [0.0, 1.0]}), tmp_path / "f.jpg")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("data, kind", [(COMPARE, "compare"), (BENCH, "bench"), (errors_report(), "errors"),
                                        (OUTLIERS, "outliers"), (PLAN, "plan"), (COMPARE["results"][2], "row"),
                                        ({"candidates": [], "anchor": "nf4", "layers": []}, "sensitivity"),
                                        ({"lowbit_layout": 1}, "saved"), ({"x": 1}, None), ([1], None)])
def test_json_kind(data, kind):
    assert result_json.json_kind(data) == kind
    assert result_json.describe(data)


def test_spread_keeps_order_spacing_and_bounds():
    ys = pd.spread([10.0, 11.0, 12.0, 50.0, 95.0, 96.0], 5.0, 0.0, 100.0)
    assert all(b - a >= 5.0 - 1e-9 for a, b in pairwise(ys))  # sorted, never closer than a label's height
    assert ys[3] == 50.0  # a label with room stays at its point
    assert sum(ys[:3]) / 3 == pytest.approx(11.0)  # a crowded group is centred on its points
    assert ys[0] >= 0.0 and ys[-1] <= 100.0


@pytest.mark.parametrize("blocks", [2, 30])  # 14 and 210 layers: issue 25 finding 21
def test_plan_layout_keeps_title_and_labels_inside_and_apart(blocks):
    """The legend covered a 14-layer plan's title, which ran off the figure's left edge, and the y label was cut
    at the top: every text box is inside the figure and the legend overlaps neither the title nor the axes."""
    kinds = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj")
    labels = ("int3", "int6", "int5", "nf4")
    saved = {"lowbit_layout": 1, "config": {"label": "budget 5"}, "quantize": {"bits_per_weight": 5.0},
             "layers": {f"model.layers.{b}.{k}": {"format": labels[(b + i) % 4], "block_size": 64,
                                                   "label": labels[(b + i) % 4]}
                        for b in range(blocks) for i, k in enumerate(kinds)}}
    fig = plots.plan_layers(saved)  # a saved model's lowbit.json: its legend has the mean and the budget too
    check(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    ax = fig.axes[0]
    title, ylabel = ax.title.get_window_extent(renderer), ax.yaxis.label.get_window_extent(renderer)
    legend = fig.legends[0].get_window_extent(renderer)
    for box in (title, ylabel, legend):
        assert page.x0 - 1 <= box.x0 and box.x1 <= page.x1 + 1 and page.y0 - 1 <= box.y0 and box.y1 <= page.y1 + 1
    assert not legend.overlaps(title) and not legend.overlaps(ax.get_window_extent(renderer))


def _tail_row(label, bits, kl, tokens=1000):
    levels = [0.0, 0.5, 0.99, 0.999, 1.0]
    return {"format": label, "bits_per_weight": bits, "kl_mean": kl, "tokens": tokens,
            "kl_quantiles": {"q": levels, "kl": [0.0, kl, 4 * kl, 8 * kl, 15 * kl]},
            "layer_sqnr": {"layers": ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"],
                           "sqnr_db": [6 * bits - 6, None]}}


def test_kl_tail_is_a_survival_curve_ending_at_the_worst_token():
    report = {"model": MODEL, "protocol": {"kind": "causal-lm"},
              "results": [_tail_row("nf4", 4.5, 0.25), _tail_row("int8", 8.5, 0.0014, tokens=500),
                          {"format": "q4_k", "error": "no"}, {"format": "old", "bits_per_weight": 4.0, "kl_mean": 1}]}
    tails, notes = pd.kl_tails(report)
    assert [t.label for t in tails] == ["nf4", "int8"]
    assert tails[0].kl == [0.25, 1.0, 2.0, 3.75] and tails[0].share_above == pytest.approx([0.5, 0.01, 0.001, 0.001])
    # 500 tokens: the 99.9% level lies between the two largest tokens, so the curve ends at the maximum's 1/500
    assert tails[1].share_above == pytest.approx([0.5, 0.01, 0.002])
    assert notes == ["q4_k: not scored", "old: no kl_quantiles"]
    fig = plots.kl_tail(report)
    check(fig)
    assert "not shown: old: no kl_quantiles" in legend_texts(fig)
    with pytest.raises(InputError, match="no row holds per-token KL quantiles"):
        plots.kl_tail(COMPARE)


def test_compare_errors_feeds_the_sqnr_heatmap():
    report = {"model": MODEL, "results": [_tail_row("nf4", 4.5, 0.25), _tail_row("int8", 8.5, 0.0014),
                                          {"format": "keep bfloat16", "bits_per_weight": 32.0, "kl_mean": 1e-4}]}
    errors = pd.compare_errors(report)
    assert [f["format"] for f in errors["formats"]] == ["nf4", "int8"]
    nf4 = errors["formats"][0]
    assert nf4["mean_sqnr_db"] == 21.0 and nf4["min_layer"] == "model.layers.0.mlp.down_proj"
    check(plots.sqnr_heatmap(errors))
    with pytest.raises(InputError, match="no row holds layer_sqnr"):
        pd.compare_errors(COMPARE)
