"""lowbit.report.plots: every figure from small result dicts shaped as the commands write them."""

import json
import subprocess
import sys

import pytest
import torch

from lowbit.errors import InputError
from lowbit.formats import get_format
from lowbit.formats.codebooks import NF_DELTA
from lowbit.report import plot_data as pd
from lowbit.report import plots
from lowbit.workflows import levels

from .helpers import BENCH, COMPARE, ENCODER, MODEL, check, legend_texts, tail_row

matplotlib_image = pytest.importorskip("matplotlib.image")


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


def test_kl_tail_is_a_survival_curve_ending_at_the_worst_token():
    report = {"model": MODEL, "protocol": {"kind": "causal-lm"},
              "results": [tail_row("nf4", 4.5, 0.25), tail_row("int8", 8.5, 0.0014, tokens=500),
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
