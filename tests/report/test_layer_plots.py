"""The per-layer figures: the SQNR heatmap, a plan's formats layer by layer, the outlier counts."""

import math

import pytest

from lowbit.errors import InputError
from lowbit.report import layer_plots
from lowbit.report import plot_data as pd

from .helpers import COMPARE, MODEL, OUTLIERS, PLAN, check, errors_report, legend_texts, tail_row

matplotlib_image = pytest.importorskip("matplotlib.image")


@pytest.mark.parametrize("blocks, grouped", [(2, False), (30, True)])
def test_sqnr_heatmap(blocks, grouped):
    report = errors_report(blocks)
    fig = layer_plots.sqnr_heatmap(report)
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
    fig = layer_plots.plan_layers(PLAN)
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
    check(layer_plots.plan_layers(saved))

    fig = layer_plots.plan_layers(COMPARE)  # the report's one row that mixes formats
    check(fig)
    assert len(fig.axes[0].patches) == 210 and "nf5/64+dq+gptq@amse (50 layers)" in legend_texts(fig)
    assert "not which" in fig.axes[0].get_xlabel()
    assert len(layer_plots.plan_layers(COMPARE, row="nf4").axes[0].patches) == 210


def test_outlier_counts_marks_systematic_features():
    data = pd.outlier_bars(OUTLIERS)
    assert data.counts == [2, 1, 1, 1]
    assert data.systematic == [1, 1, 0, 1]  # the FFN contraction reads another width: dim 3 there is not it
    fig = layer_plots.outlier_counts(OUTLIERS)
    check(fig)
    assert "systematic" in legend_texts(fig) and "dim 3" in legend_texts(fig)
    assert "count" in fig.axes[0].get_ylabel()


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
    fig = layer_plots.plan_layers(saved)  # a saved model's lowbit.json: its legend has the mean and the budget too
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


def test_compare_errors_feeds_the_sqnr_heatmap():
    report = {"model": MODEL, "results": [tail_row("nf4", 4.5, 0.25), tail_row("int8", 8.5, 0.0014),
                                          {"format": "keep bfloat16", "bits_per_weight": 32.0, "kl_mean": 1e-4}]}
    errors = pd.compare_errors(report)
    assert [f["format"] for f in errors["formats"]] == ["nf4", "int8"]
    nf4 = errors["formats"][0]
    assert nf4["mean_sqnr_db"] == 21.0 and nf4["min_layer"] == "model.layers.0.mlp.down_proj"
    check(layer_plots.sqnr_heatmap(errors))
    with pytest.raises(InputError, match="no row holds layer_sqnr"):
        pd.compare_errors(COMPARE)
