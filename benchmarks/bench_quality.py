"""Quality of lowbit's 4-bit formats against the peers' own quantizers, on the same windows in one run.

    .venv/bin/python benchmarks/bench_quality.py [--formats nf4,int4_asym/64] [--model minilm] [--windows 16]
                                                 [--text FILE] [--json out.json] [--no-peers]
                                                 [--budgets 4.5,4.25,3.25] [--candidates LABELS]
                                                 [--sensitivity FILE] [--qat LABELS] [--qat-steps N]
                                                 [--qat-init mse|rule|lsq|gptq]

Protocol: ``lowbit compare``'s (README "Evaluation protocol"): the embedded SmolLM2-135M-Instruct,
16 windows x 512 tokens of the default text, per-token KL(p_reference || p_quantized) over the full
vocabulary and the same-top-1 rate; ``--model minilm`` scores mean 1 - cos of sentence embeddings.
The reference is computed once and cached (``lowbit.evaluate.Evaluation``), so every row below is
scored against the same reference log-probs on the same token windows.

Peers (``--no-peers`` leaves them out): every ``nn.Linear`` except ``lm_head`` (the layers lowbit
quantizes, ``lowbit.layers.surgery.select_linears``) gets the peer's dequantized weight in a copy of the
fp32 model, which ``Evaluation.score`` then scores exactly as it scores lowbit's rows:

- bitsandbytes nf4, block 64: ``bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")``
  then ``dequantize_4bit`` (CPU).
- gguf q4_0: gguf-py's ``gguf.quants.quantize(w, GGMLQuantizationType.Q4_0)`` then ``dequantize``.
- hqq 4-bit, group 64, two rows (hqq 0.2.8, hqq/core/quantize.py and optimize.py): "hqq 4-bit/64" is
  ``Quantizer.quantize(w, nbits=4, group_size=64, optimize=True, axis=1)`` with that function's own
  ``round_zero=False``, the setting behind the project's anchor (KL 0.204); "HQQLinear default" is what
  ``HQQLinear(linear, BaseQuantizeConfig(nbits=4, group_size=64), device="cpu")`` does: the same call
  with ``round_zero=True`` (``hqq_base_quant_config`` sets it for 4 bits). Both: groups of 64 along a
  row (axis 1), min/max init, the proximal zero-point solver (lp 0.7, 20 iterations, early stop) in
  float32 on CPU, then scale and zero cast to the layer's compute dtype, float16 (``Quantizer.cuda``),
  and dequantized in float16 (``Quantizer.dequantize``). The round_zero=True path equals
  ``HQQLinear.dequantize()`` bit for bit (checked on SmolLM2, one layer of each projection).

Bits per weight of a peer are counted from the tensors it returns, summed over the layers:
bitsandbytes the packed codes plus its fp32 absmax per block (4 + 32/64 = 4.5); q4_0 the bytes
gguf-py writes (18 per 32 weights = 4.5); hqq the packed codes plus its float16 scale and zero per
group (4 + 32/64 = 4.5). Format-wide constants (bitsandbytes' 16-entry code table) are not counted,
as lowbit does not count its own. A peer's "quantize s" times its quantize call only; lowbit's is
``quantize_model``'s time (``lowbit compare``'s column). Unquantized tensors stay fp32 in every row.

Budget rows (causal LMs; ``--budgets ''`` leaves them out): ``lowbit quantize --budget``'s plan for each budget
over ``--candidates``, chosen from a sensitivity table measured here on the calibration windows (or read from
``--sensitivity``, a ``lowbit sensitivity --json`` file of the same model), then quantized and scored like any row;
the row shows the plan's predicted KL too.

QAT rows (causal LMs; ``--qat ''`` leaves them out): for each ``--qat`` format, ``lowbit qat``'s training
(``lowbit.workflows.qat.train_quantized``, ``--qat-steps`` steps from ``--qat-init``, default settings otherwise)
on a copy of the model, scored like any row, and printed in a second table beside the same format's round-to-nearest
and ``+gptq@amse`` rows (added to the formats scored): format, method, steps, minutes, KL, perplexity, same top-1.

Time on 2 cores: the default run takes about 80 minutes without the QAT rows (the sensitivity table 20 minutes, each
GPTQ row and each budget plan 6 minutes) and about two hours more with them (each QAT row 25-30 minutes);
``--sensitivity`` saves the first, ``--formats``, ``--budgets`` and ``--qat`` pick rows.

The llama.cpp rows are fixed figures, measured separately with llama.cpp's ``perplexity
--kl-divergence`` on the default protocol (README); they are shown for the embedded SmolLM2 only.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from functools import partial

import torch
from rich.table import Table

from lowbit.calibration.importance import calibration_batches
from lowbit.commands.common import check_protocol_args, load
from lowbit.commands.common import console as make_console
from lowbit.eval.protocol import DEFAULT_WINDOW, DEFAULT_WINDOWS
from lowbit.evaluate import Evaluation, compare, materialize, model_limits
from lowbit.files.atomic import write_json
from lowbit.layers.surgery import select_linears
from lowbit.methods.qat import check_qat_config
from lowbit.methods.qat_train import QATSettings
from lowbit.models.loader import CAUSAL_LM
from lowbit.planning import QuantConfig, QuantPlan
from lowbit.planning.budget import choose
from lowbit.planning.sensitivity import SENSITIVITY_CALIBRATE, Sensitivity, measure_sensitivity
from lowbit.progress import progress_bar
from lowbit.workflows import qat as qat_workflow

# Labels of formats being added: only those QuantConfig.parse accepts in this checkout are run.
DEFAULT_LOWBIT = ("nf4", "nf4@mse", "nf4@amse", "nf4/32+dq@amse", "nf4/20+dq@amse", "int4_asym/64",
                  "int4_asym/64@hqq", "int4_asym/64@ahqq", "qq4", "lloyd4", "nf4/32+dq+gptq@amse",
                  "nf4/32+dq+had+gptq@amse", "nf4/20+dq+awq@amse", "nf4/32+dq+awq+gptq@amse",
                  "lloyd4/32+dq+gptq@amse", "lloyd4/32+dq+gptq+cb@amse")
BASELINE = "bitsandbytes nf4/64"
HQQ, HQQ_LINEAR = "hqq 4-bit/64", "hqq 4-bit/64, HQQLinear default"
# Issue 9's targets: a plan at each budget (bits per weight), from these candidates (README "Sensitivity and
# mixed precision under a bits budget").
DEFAULT_BUDGETS = (4.5, 4.25, 3.25)
BUDGET_CANDIDATES = ("nf3/64+dq+gptq@amse", "nf4/64+dq+gptq@amse", "nf4/32+dq+gptq@amse", "nf5/64+dq+gptq@amse",
                     "nf6/64+dq@amse", "int8/64+dq")

# Issue 12's table: quantization-aware training against round to nearest and GPTQ at the same bits.
DEFAULT_QAT = ("int3/64", "int4/64", "int4/64+had", "int2/64")
PTQ_BEST = "+gptq@amse"  # the best post-training method of the earlier issues at these bits

# The project's anchors on the default protocol: what the peer rows must reproduce (within ~1%).
ANCHORS = {
    CAUSAL_LM: {BASELINE: (0.259, 0.737), "gguf q4_0": (0.268, 0.730), HQQ: (0.204, 0.762)},
    "encoder": {BASELINE: (0.0298, None)},
}
LLAMA_CPP = "(llama.cpp, measured separately, see README)"
# (row, bits/weight, KL mean, same top-1): llama.cpp perplexity --kl-divergence, default protocol
LLAMA_CPP_ROWS = (
    ("Q4_K_M imatrix", 5.53, 0.027, None),
    ("Q3_K_M imatrix", 4.63, 0.079, None),
    ("IQ4_NL imatrix", 4.50, 0.083, 0.846),
    ("IQ4_XS imatrix", 4.44, 0.084, 0.846),
    ("Q2_K imatrix", 4.23, 0.276, None),
    ("IQ4_NL", 4.525, 0.179, None),
    ("Q4_0 imatrix", 4.51, 0.157, 0.799),
)


def _bnb_nf4():
    import bitsandbytes.functional as F

    def quantize(w):
        return F.quantize_4bit(w, blocksize=64, quant_type="nf4")

    def dequantize(packed_state):
        return F.dequantize_4bit(*packed_state)

    def nbytes(packed_state):
        packed, state = packed_state
        return _bytes(packed) + _bytes(state.absmax)  # compress_statistics=False: no nested absmax

    return quantize, dequantize, nbytes


def _gguf_q4_0():
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    q4_0 = GGMLQuantizationType.Q4_0
    return (lambda w: quantize(w.numpy(), q4_0), lambda data: torch.from_numpy(dequantize(data, q4_0)),
            lambda data: data.nbytes)


def _hqq_g64(round_zero: bool):
    """hqq 0.2.8 4-bit, group 64, float16 scale and zero (module docstring: the two settings)."""
    from hqq.core.quantize import Quantizer

    def quantize(w):
        # device="cpu": hqq's default is "cuda"; on CPU its solver runs in float32 (optimize.py)
        packed, meta = Quantizer.quantize(w, nbits=4, group_size=64, optimize=True, axis=1,
                                          round_zero=round_zero, device="cpu")
        meta |= {"scale": meta["scale"].half(), "zero": meta["zero"].half(), "compute_dtype": torch.float16}
        return packed, meta

    def nbytes(packed_meta):
        packed, meta = packed_meta
        return _bytes(packed) + _bytes(meta["scale"]) + _bytes(meta["zero"])

    return quantize, lambda packed_meta: Quantizer.dequantize(*packed_meta), nbytes


PEERS = {BASELINE: _bnb_nf4, "gguf q4_0": _gguf_q4_0, HQQ: partial(_hqq_g64, round_zero=False),
         HQQ_LINEAR: partial(_hqq_g64, round_zero=True)}


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def peer_row(evaluation: Evaluation, model: torch.nn.Module, name: str, progress: bool) -> dict:
    """Score ``model`` with each selected layer's weight replaced by the peer's dequantized one."""
    quantize, dequantize, nbytes = PEERS[name]()
    quantized = copy.deepcopy(model)
    targets = select_linears(quantized, QuantPlan.uniform("nf4"))  # the layers every lowbit row quantizes
    numel = stored = 0
    seconds = 0.0
    with progress_bar(len(targets), f"quantizing to {name}", enabled=progress) as advance:
        for _, linear in targets:
            weight = linear.weight.detach()
            start = time.perf_counter()
            state = quantize(weight)
            seconds += time.perf_counter() - start
            linear.weight.data = dequantize(state).to(torch.float32).reshape(weight.shape)
            numel += weight.numel()
            stored += nbytes(state)
            advance()
    row = {"format": name, "peer": True, "bits_per_weight": 8 * stored / numel, "weight_bytes_quantized": stored,
           "quantized_layers": len(targets), "quantize_seconds": seconds}
    start = time.perf_counter()
    row |= evaluation.score(quantized, label=f"scoring {name}")
    row["eval_seconds"] = time.perf_counter() - start
    return row


def default_labels() -> tuple[list[str], dict[str, str]]:
    """DEFAULT_LOWBIT less the labels this checkout cannot parse yet, and why each was left out."""
    labels, skipped = [], {}
    for label in DEFAULT_LOWBIT:
        try:
            QuantConfig.parse(label)
            labels.append(label)
        except ValueError as e:
            skipped[label] = str(e)
    return labels, skipped


def run(args) -> int:
    if args.formats is None:
        labels, skipped = default_labels()
    else:
        labels, skipped = [label.strip() for label in args.formats.split(",") if label.strip()], {}
    qat_configs = [QuantConfig.parse(label.strip()) for label in args.qat.split(",") if label.strip()]
    for config in qat_configs:
        check_qat_config(config)  # a label QAT cannot train fails now
    configs = list({c.label: QuantPlan.uniform(c) for c in map(QuantConfig.parse, labels)}.values())  # fails now
    if not configs and args.no_peers and not qat_configs:
        raise ValueError("nothing to score: --no-peers and --formats names no format")
    args.window = DEFAULT_WINDOW
    check_protocol_args(args)
    con = make_console()
    for label, why in skipped.items():
        con.print(f"skipped {label}: {why}")
    model, tokenizer, info = load(args.model, con)
    causal = info.kind == CAUSAL_LM
    default_protocol = args.text is None and (not causal or args.windows in (None, DEFAULT_WINDOWS))
    report = {"model": None, "protocol": None, "reference": None, "rows": [], "skipped": skipped,
              "llama_cpp": [] if causal and args.model in (None, "smollm2") else None}
    if report["llama_cpp"] is not None:
        report["llama_cpp"] = [{"format": f"{n} {LLAMA_CPP}", "bits_per_weight": b, "kl_mean": kl, "top1": t}
                               for n, b, kl, t in LLAMA_CPP_ROWS]

    def save(lowbit_report: dict | None = None) -> None:
        if lowbit_report is not None:
            report.update({k: lowbit_report[k] for k in ("model", "protocol", "reference")})
            report["rows"] = [r for r in report["rows"] if r.get("peer")] + lowbit_report["results"]
        if args.json:
            write_json(args.json, report)

    budgets = budget_plans(args, model, tokenizer, info, con) if causal else {}
    configs += [chosen.plan for chosen in budgets.values()]
    qat_configs = qat_configs if causal else []  # lowbit qat trains causal LMs
    compared = [QuantPlan.uniform(c.label + suffix) for c in qat_configs for suffix in ("", PTQ_BEST)]
    configs = list({c.label: c for c in configs + compared}.values())  # the rows QAT is measured against
    predicted = {chosen.plan.label: chosen.predicted_kl for chosen in budgets.values()}

    def save_named(lowbit_report: dict) -> None:
        for row in lowbit_report["results"]:
            if row["format"] in predicted:
                row["predicted_kl"] = predicted[row["format"]]
        save(lowbit_report)

    # lowbit's rows first: compare computes (or reads) the cached reference, the peers then read it
    if configs:
        save_named(compare(model, tokenizer, info, configs, text=args.text, windows=args.windows, on_result=save_named))
    if not args.no_peers or qat_configs:
        evaluation = Evaluation(info, tokenizer, lambda: model, text=args.text, windows=args.windows,
                                **model_limits(model))
        if report["protocol"] not in (None, evaluation.protocol_dict):
            raise RuntimeError(f"the peers' protocol {evaluation.protocol_dict} is not lowbit's {report['protocol']}")
        report["protocol"] = evaluation.protocol_dict
    if not args.no_peers:
        peer_rows = []
        for name in PEERS:
            peer_rows.append(peer_row(evaluation, model, name, progress=True))
            report["rows"] = peer_rows + [r for r in report["rows"] if not r.get("peer")]
            save()
    if qat_configs:
        data = qat_workflow.training_text(tokenizer, args.text, scored=args.windows or DEFAULT_WINDOWS)
        settings = QATSettings(steps=args.qat_steps, lr=qat_workflow.DEFAULT_LR, scale_lr=qat_workflow.DEFAULT_SCALE_LR)
        for config in qat_configs:
            report["rows"].append(qat_row(evaluation, model, tokenizer, info, config, settings, data, args.qat_init))
            save()
    con.print(quality_table(report, info, causal, default_protocol))
    if qat_configs:
        con.print(qat_table(report, [c.label for c in qat_configs]))
    for note in anchor_notes(report, causal, default_protocol):
        con.print(note)
    if args.json:
        con.print(f"wrote {args.json}")
    return 1 if any("error" in r for r in report["rows"]) else 0


def qat_row(evaluation: Evaluation, model, tokenizer, info, config: QuantConfig, settings: QATSettings, data,
            init: str) -> dict:
    """``lowbit qat``'s training of a copy of ``model`` to ``config``, scored on the protocol's windows."""
    student = copy.deepcopy(model)
    quantized, record = qat_workflow.train_quantized(student, tokenizer, info.file_hash, QuantPlan.uniform(config),
                                                     settings, data, init=init)
    materialize(student)
    label = f"{config.label} qat"
    row = {"format": label, "qat": record, "bits_per_weight": quantized.bits_per_weight,
           "quantized_layers": len(quantized.layers), "quantize_seconds": record["seconds"]}
    return row | evaluation.score(student, label=f"scoring {label}")


def qat_table(report: dict, labels: list[str]) -> Table:
    """Issue 12's table: each QAT format's round to nearest, best post-training method and QAT rows."""
    table = Table(title="quantization-aware training (LSQ) against post-training quantization, same windows")
    for header in ("format", "method", "steps", "minutes", "KL mean", "PPL", "same top-1"):
        table.add_column(header, justify="left" if header in ("format", "method") else "right", no_wrap=True)
    rows = {r["format"]: r for r in report["rows"]}
    for label in labels:
        for name, method in ((label, "round to nearest"), (label + PTQ_BEST, PTQ_BEST),
                             (f"{label} qat", "QAT")):
            row = rows.get(name)
            if row is None or "error" in row:
                table.add_row(label, method, *["-"] * 5)
                continue
            qat = row.get("qat", {})
            table.add_row(label, method + (f", init {qat['init']}" if qat else ""), _fmt(qat.get("steps"), "d"),
                          _fmt(row.get("quantize_seconds", 0) / 60, ".1f"), _fmt(row.get("kl_mean"), ".4f"),
                          _fmt(row.get("ppl"), ".2f"), _fmt(row.get("top1"), ".2%"))
    return table


def budget_plans(args, model, tokenizer, info, con) -> dict:
    """``{budget: BudgetPlan}`` from ``--sensitivity`` or a table measured on the calibration windows."""
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    if not budgets:
        return {}
    candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    if args.sensitivity:
        table = Sensitivity.load(args.sensitivity)
        if table.model.get("file_hash") not in (None, info.file_hash):
            raise ValueError(f"{args.sensitivity} was measured on another model than {info.name}")
    else:
        scored = args.windows or DEFAULT_WINDOWS
        batches, _ = calibration_batches(tokenizer, info.kind, args.text, scored=scored, count=SENSITIVITY_CALIBRATE)
        table = measure_sensitivity(model, candidates, batches)
        con.print(f"sensitivity of {len(table.numel)} layers x {len(candidates)} candidates: {table.seconds:.0f} s")
    return {b: choose(table, b, candidates) for b in budgets}


def baseline_kl(report: dict, causal: bool, default_protocol: bool) -> tuple[float | None, str]:
    """The bitsandbytes nf4 score the ratio column divides by: measured here, else the anchor."""
    key = "kl_mean" if causal else "cos_dist_mean"
    measured = next((r[key] for r in report["rows"] if r["format"] == BASELINE), None)
    if measured is not None:
        return measured, f"{measured:.5f}, measured in this run"
    if default_protocol:
        anchor = ANCHORS[CAUSAL_LM if causal else "encoder"][BASELINE][0]
        return anchor, f"anchor {anchor} (not measured: --no-peers)"
    return None, "- (not measured: --no-peers; no anchor for this protocol)"


def quality_table(report: dict, info, causal: bool, default_protocol: bool) -> Table:
    key = "kl_mean" if causal else "cos_dist_mean"
    base, base_note = baseline_kl(report, causal, default_protocol)
    protocol = report["protocol"]
    scope = (f"{protocol['windows']} windows x {protocol['window']} tokens of {protocol['text']}" if causal
             else f"{protocol['sentences']} paragraphs of {protocol['text']}")
    table = Table(title=f"{info.name} ({info.source}): {scope}")
    score = "KL mean" if causal else "1-cos mean"
    headers = ["row", "bits/weight", score, *(["same top-1"] if causal else []), f"{score} / bnb nf4", "quantize s"]
    for header in headers:
        table.add_column(header, justify="left" if header == "row" else "right", no_wrap=header != "row")
    fixed = report["llama_cpp"] or []
    # the llama.cpp figures are on the default protocol: off it, they are divided by the anchor
    fixed_base = base if default_protocol else ANCHORS[CAUSAL_LM][BASELINE][0]
    for row in [*report["rows"], *fixed]:
        value, is_fixed = row.get(key), any(row is r for r in fixed)
        divisor = fixed_base if is_fixed else base
        name = row["format"] + (" (peer)" if row.get("peer") else "")
        if "predicted_kl" in row:
            name += f" (predicted KL {row['predicted_kl']:.4f})"
        cells = [name, _fmt(row.get("bits_per_weight"), ".3f"),
                 _fmt(value, ".5f")]
        if causal:
            cells.append(_fmt(row.get("top1"), ".2%"))
        cells += [_fmt(value / divisor if value is not None and divisor else None, ".3f"),
                  _fmt(row.get("quantize_seconds"), ".2f")]
        table.add_row(*cells, style="dim" if is_fixed else None)
    notes = [f"{score} / bnb nf4: lower is better; bitsandbytes nf4/64's {score}: {base_note}"]
    notes += [f"{r['format']}: not scored: {r['error']}" for r in report["rows"] if "error" in r]
    if fixed and not default_protocol:
        notes.append(f"the llama.cpp rows are on the default protocol (16 windows of the default text), not this "
                     f"one; their ratio divides by bitsandbytes nf4/64's anchor {fixed_base}")
    table.caption, table.caption_justify = "\n".join(notes), "left"
    return table


def anchor_notes(report: dict, causal: bool, default_protocol: bool) -> list[str]:
    """Each peer's figures against the project's anchors (default protocol only)."""
    if not default_protocol:
        return []
    key = "kl_mean" if causal else "cos_dist_mean"
    notes = []
    for name, (score, top1) in ANCHORS[CAUSAL_LM if causal else "encoder"].items():
        row = next((r for r in report["rows"] if r["format"] == name), None)
        if row is None:
            continue
        off = row[key] / score - 1
        line = f"anchor {name}: {row[key]:.5f} vs {score} ({off:+.1%})"
        if top1 is not None:
            line += f", same top-1 {row['top1']:.2%} vs {top1:.1%}"
        notes.append(line + ("" if abs(off) <= 0.01 else "  (more than 1% off the anchor)"))
    return notes


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", help="comma-separated lowbit labels "
                                      "FORMAT[/BLOCK][+dq][+awq][+had][+gptq][+cb][@SEARCH] (default: "
                                      f"those of {','.join(DEFAULT_LOWBIT)} this checkout accepts)")
    ap.add_argument("--model", help="as lowbit compare --model (default: embedded SmolLM2; 'minilm': encoder)")
    ap.add_argument("--windows", type=int, help=f"windows scored (default {DEFAULT_WINDOWS}; causal models only)")
    ap.add_argument("--text", metavar="FILE", help="UTF-8 text to score on (default: Python's pydoc topics)")
    ap.add_argument("--json", metavar="FILE", help="write every row (peers, lowbit, llama.cpp) as JSON, atomically")
    ap.add_argument("--no-peers", action="store_true", help="score only the lowbit formats")
    ap.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)),
                    help="bits-per-weight budgets to plan and score ('' for none; default %(default)s)")
    ap.add_argument("--candidates", default=",".join(BUDGET_CANDIDATES), help="formats the budget plans choose "
                    "from (default %(default)s)")
    ap.add_argument("--sensitivity", metavar="FILE", help="a `lowbit sensitivity --json` table of the same model and "
                    "candidates, instead of measuring one")
    ap.add_argument("--qat", default=",".join(DEFAULT_QAT),
                    help="formats to train with lowbit qat and score ('' for none; default %(default)s)")
    ap.add_argument("--qat-steps", type=int, default=qat_workflow.DEFAULT_STEPS, help="training steps of each QAT row "
                    "(default %(default)s, lowbit qat's)")
    ap.add_argument("--qat-init", default=qat_workflow.DEFAULT_INIT, choices=qat_workflow.INIT_CHOICES,
                    help="lowbit qat --init of each QAT row (default %(default)s)")
    args = ap.parse_args()
    try:
        return run(args)
    except (ValueError, OSError) as e:
        print(f"bench_quality: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
