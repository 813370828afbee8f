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


def _row(label, bits, kl, top1, **extra):
    return {"format": label, "block_size": 64, "double_quant": False, "bits_per_weight": bits,
            "weight_bytes": int(bits * 1e6), "quantized_layers": 210, "quantize_seconds": 0.5, "ppl": 15 + 20 * kl,
            "kl_mean": kl, "kl_median": kl * 0.8, "kl_p99": kl * 4, "kl_max": kl * 15, "top1": top1,
            "eval_seconds": 10.0, **extra}


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
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2  # KL against bits, and the plan row's layers
    for data in images:
        pixels = matplotlib.image.imread(io.BytesIO(base64.b64decode(data)), format="png")
        assert pixels.shape[0] > 200 and pixels.shape[1] > 200


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
    assert json.loads(found.group(1)) == [True, True]  # both figures decoded


def test_a_report_without_plottable_rows_is_still_written(tmp_path):
    # every format failed but the keep row, or every row is exact: no point for a log axis, no KL figure
    report = json.loads(json.dumps(REPORT))
    report["results"] = [_row("keep bfloat16", 32.0, 0.0001, 0.99), {"format": "q4_k", "error": "no whole blocks"}]
    page = write_report(report, tmp_path / "r.html").read_text()
    assert "no whole blocks" in page and "data:image/png" not in page and "Shaded" not in page


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
