"""The HTML report: self-contained (no network, no script needed), and rendered by headless Chromium:
a screenshot that is not blank, every image decoded, no console message."""

import base64
import io
import json
import re
import shutil
import subprocess

import matplotlib.image
import pytest

from lowbit.cli import main
from lowbit.report.html import render, report_figures, write_report

MODEL = {"name": "SmolLM2-135M-Instruct.Q4_1", "source": "smollm2", "kind": "causal-lm",
         "file_hash": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"}


LEVELS = [0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 1.0]
LAYERS = [f"model.layers.{b}.{k}" for b in range(30) for k in ("self_attn.q_proj", "mlp.down_proj")]


def _row(label, bits, kl, top1, **extra):
    # quantiles from 0.02 to 15 times the mean, as lowbit.eval.causal.kl_quantiles keeps them; SQNR ~6 dB a bit
    quantiles = {"q": LEVELS, "kl": [kl * (0.02 + 15 * q ** 8) for q in LEVELS]}
    sqnr = {"layers": LAYERS, "sqnr_db": [6.02 * bits - 6 + (i % 7) / 3 for i in range(len(LAYERS))]}
    return {"format": label, "block_size": 64, "double_quant": False, "bits_per_weight": bits,
            "weight_bytes": int(bits * 1e6), "quantized_layers": 210, "quantize_seconds": 0.5, "ppl": 15 + 20 * kl,
            "kl_mean": kl, "kl_median": kl * 0.8, "kl_p99": kl * 4, "kl_max": kl * 15, "top1": top1,
            "eval_seconds": 10.0, "tokens": 8176, "kl_quantiles": quantiles, "layer_sqnr": sqnr, **extra}


REPORT = {
    "lowbit_version": "0.1.0", "date": "2026-11-25T02:00:00+00:00",
    "versions": {"python": "3.11.7", "lowbit": "0.1.0", "torch": "2.13.0", "transformers": "5.23.0"},
    "model": MODEL,
    "protocol": {"kind": "causal-lm", "text": "pydoc_data.topics", "window": 512, "windows": 16},
    "reference": {"weight_bytes": 538_100_000, "ppl": 14.937},
    "results": [
        _row("bf16", 16.0, 0.00002, 0.999), _row("int8", 8.5, 0.00143, 0.978), _row("nf4", 4.5, 0.25876, 0.7367),
        _row("nf4+dq", 4.127, 0.26032, 0.7364), _row("int4/64", 4.5, 0.51299, 0.642),
        _row("plan[q4_k|q8_0]", 5.2, 0.1, 0.8, layer_formats={"q4_k": 120, "q8_0": 90}),
        {"format": "q4_k", "error": "q4_k needs each row to hold whole blocks of 256; the last dimension is 576"},
    ],
}


def test_page_is_self_contained_and_holds_the_provenance():
    page = render(REPORT, report_figures(REPORT))
    assert "<script" not in page and "<link" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)  # nothing fetched
    for text in (MODEL["file_hash"], "2026-11-25T02:00:00+00:00", "torch", "2.13.0", "pydoc_data.topics",
                 "0.25876", "needs each row to hold whole blocks", "120 q4_k"):
        assert text in page
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    # KL against bits, the per-token KL distribution, SQNR per layer, and the plan row's layers
    assert [alt for alt, _ in images] == FIGURES
    for _, data in images:
        pixels = matplotlib.image.imread(io.BytesIO(base64.b64decode(data)), format="png")
        assert pixels.shape[0] > 200 and pixels.shape[1] > 200


FIGURES = ["quality against size", "distribution of per-token KL", "weight error per layer",
           "layers of plan[q4_k|q8_0]"]


def test_a_report_before_the_distribution_and_layer_figures_still_renders():
    """A compare JSON written before rows held kl_quantiles and layer_sqnr: those figures are a note instead."""
    report = json.loads(json.dumps(REPORT))
    for row in report["results"]:
        row.pop("kl_quantiles", None)
        row.pop("layer_sqnr", None)
    page = render(report, report_figures(report))
    assert re.findall(r'<img alt="([^"]+)"', page) == [FIGURES[0], FIGURES[3]]
    assert "distribution of per-token KL: Not drawn: no row holds per-token KL quantiles" in page
    assert "weight error per layer: Not drawn: no row holds layer_sqnr" in page


def test_text_is_escaped():
    report = json.loads(json.dumps(REPORT))
    report["model"]["name"] = "<img src=x onerror=alert(1)>"
    page = render(report)
    assert "<img src=x" not in page and "&lt;img src=x" in page


def test_report_command_and_bad_input(tmp_path, capsys):
    results = tmp_path / "out.json"
    results.write_text(json.dumps(REPORT))
    out = tmp_path / "r.html"
    assert main(["report", str(results), "-o", str(out)]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert main(["report", str(results), "-o", str(tmp_path / "r.png")]) == 2
    assert "name the file .html" in capsys.readouterr().err
    (tmp_path / "errors.json").write_text(json.dumps({"formats": [], "layers": []}))
    assert main(["report", str(tmp_path / "errors.json"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "errors" in err
    assert main(["report", str(tmp_path / "missing.json"), "-o", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# the flags the machine's browser tests use: no sandbox as root, and no background connections (no network)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0"]
# run only by the test, on a copy of the page: lists whether each image decoded (the report itself has no script)
CHECK = ("<script>addEventListener('load', () => { const p = document.createElement('pre'); p.id = 'lowbit-check';"
         " p.textContent = JSON.stringify([...document.images].map(i => i.complete && i.naturalWidth > 0));"
         " document.body.appendChild(p); });</script>")


def _chromium(tmp_path, *args):
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/setup.sh installs it)")
def test_headless_chromium_renders_the_report(tmp_path):
    page = tmp_path / "report.html"
    write_report(REPORT, page)
    shot = tmp_path / "shot.png"
    r = _chromium(tmp_path, "--window-size=1280,2000", f"--screenshot={shot}", page.as_uri())
    assert shot.is_file(), r.stderr[-2000:]
    assert "CONSOLE" not in r.stderr, r.stderr  # chromium logs every console message of the page
    pixels = matplotlib.image.imread(shot)[..., :3]
    ink = (pixels.min(axis=2) < 0.6).mean()  # share of pixels darker than light grey: text, lines, points
    assert 0.005 < ink < 0.5, ink
    assert pixels.std() > 0.05
    checked = tmp_path / "checked.html"
    checked.write_text(page.read_text().replace("</body>", CHECK + "</body>"))
    r = _chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", checked.as_uri())
    found = re.search(r'<pre id="lowbit-check">([^<]*)</pre>', r.stdout)
    assert found, r.stderr[-2000:]
    assert json.loads(found.group(1)) == [True] * len(FIGURES)  # every figure decoded
    alts = re.findall(r'<img alt="([^"]+)"', r.stdout)
    assert alts == FIGURES  # each figure is there, in order


def test_a_report_without_plottable_rows_is_still_written(tmp_path):
    # every format failed but the keep row, or every row is exact: no point for a log axis, no KL figure
    report = json.loads(json.dumps(REPORT))
    keep = _row("keep bfloat16", 32.0, 0.0001, 0.99)
    del keep["layer_sqnr"]  # a keep row quantizes no layer
    report["results"] = [keep, {"format": "q4_k", "error": "no whole blocks"}]
    page = write_report(report, tmp_path / "r.html").read_text()
    assert "no whole blocks" in page and "Shaded" not in page
    assert re.findall(r'<img alt="([^"]+)"', page) == ["distribution of per-token KL"]  # the keep row's tokens


def test_keep_row_is_not_on_the_pareto_front():
    report = json.loads(json.dumps(REPORT))
    report["results"].insert(0, _row("keep bfloat16", 32.0, 0.000001, 0.999))
    page = render(report)
    assert re.search(r"<tr class=best><td>bf16</td>", page)
    assert not re.search(r"<tr class=best><td>keep bfloat16</td>", page)


def test_results_without_model_or_protocol_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"results": []}))
    assert main(["report", str(bad), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no model, protocol, reference" in err


def test_compare_rows_hold_what_the_figures_draw(tiny_lm_dir):
    """compare keeps per-token KL quantiles (the table's median, p99 and max among them, the same numbers) and
    each quantized layer's weight SQNR, as lowbit errors measures it."""
    from lowbit import load_model
    from lowbit.eval.tensor import tensor_errors
    from lowbit.evaluate import compare
    from lowbit.layers.surgery import quantize_weight
    from lowbit.planning import QuantPlan

    model, tokenizer, info = load_model(str(tiny_lm_dir))
    plans = [QuantPlan.uniform("nf4"), QuantPlan.uniform("int4/32+had")]
    report = compare(model, tokenizer, info, plans, windows=1, window=64, progress=False)
    for row in report["results"]:
        q = dict(zip(row["kl_quantiles"]["q"], row["kl_quantiles"]["kl"], strict=True))
        assert (q[0.5], q[0.99], q[1.0]) == (row["kl_median"], row["kl_p99"], row["kl_max"])
        assert q[0.0] <= q[0.01] <= q[0.999] <= q[1.0]
        assert len(row["layer_sqnr"]["layers"]) == row["quantized_layers"] == 14
    nf4 = report["results"][0]["layer_sqnr"]
    for name, db in zip(nf4["layers"], nf4["sqnr_db"], strict=True):
        weight = model.get_submodule(name).weight
        expected = tensor_errors(weight, quantize_weight(weight, plans[0].uniform_config).dequantize()).sqnr_db
        assert db == pytest.approx(expected, rel=1e-9)
    assert all(10 < db < 40 for db in report["results"][1]["layer_sqnr"]["sqnr_db"])  # +had: unrotated weights
