"""LLM.int8() (``int8_outlier``) speed on the CPU: one layer against fp32 ``nn.Linear`` and bitsandbytes'
``Linear8bitLt``, and a whole-model evaluation against the fp32 reference.

    .venv/bin/python benchmarks/bench_int8.py [--windows 2] [--model M] [--threshold 6]

Layers: the embedded model's four linear shapes and 4096x4096, fed 1 and 512 tokens of standard-normal
activations with two planted outlier columns (x 20, so |x| >= 6 in most rows: the float path runs, as it does
for a real model's hidden states). Each time is the median of repeated calls after a warm-up, all in this run;
the ratios are what to read, the VM moves single times by 15-25%.

- lowbit int8_outlier: ``Int8OutlierLinear`` as ``lowbit compare`` scores it (``materialize()``: the integer
  codes kept as float32), and "packed", decoding the int8 codes from the stored bytes on each call.
- bitsandbytes: ``Linear8bitLt(threshold=6, has_fp16_weights=False).eval()`` on the CPU (it casts activations
  to float16 first).

Whole model: ``Evaluation.score`` (forward, log-softmax, KL against the cached reference) of the model
quantized to int8_outlier, against a transformers forward of the fp32 original over the same windows; and,
for the loss, the mean KL to the original on the first window of lowbit's int8_outlier model and of the
model with every layer but the head swapped for bitsandbytes' Linear8bitLt.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import tempfile
import time

import bitsandbytes as bnb
import torch
from rich.table import Table

from lowbit.commands.common import console as make_console
from lowbit.commands.common import load
from lowbit.evaluate import Evaluation, materialize
from lowbit.layers.outlier_linear import Int8OutlierLinear, native_int_mm
from lowbit.layers.surgery import linears
from lowbit.planning import QuantPlan
from lowbit.workflows.run import run

BIG = (4096, 4096)  # (in, out) of a 7B model's attention projection, the size the paper's speed figures use


def median_seconds(fn, budget: float = 1.0, most: int = 50) -> float:
    """Median of ``fn()`` over as many calls as fit in ``budget`` seconds (3 to ``most``), after a warm-up."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (len(times) < most and time.perf_counter() - start < budget):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def activations(tokens: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=g)
    x[:, [width // 3, 2 * width // 3]] *= 20
    return x


def layer_rows(shapes, threshold: float) -> list[tuple]:
    rows = []
    for k, n in shapes:
        torch.manual_seed(k + n)
        lin = torch.nn.Linear(k, n).eval()
        ours = Int8OutlierLinear.from_linear(lin, threshold=threshold).materialize()
        packed = Int8OutlierLinear.from_linear(lin, threshold=threshold)
        theirs = bnb.nn.Linear8bitLt(k, n, has_fp16_weights=False, threshold=threshold)
        theirs.load_state_dict(lin.state_dict())
        theirs = theirs.to("cpu").eval()
        for tokens in (1, 512):
            x = activations(tokens, k, seed=tokens)
            with torch.inference_mode():
                t = {name: median_seconds(lambda m=m, x=x: m(x)) for name, m in
                     (("fp32", lin), ("lowbit", ours), ("packed", packed), ("bnb", theirs))}
            rows.append((f"{k}x{n}", tokens, t))
    return rows


def model_shapes(model) -> list[tuple[int, int]]:
    shapes = {(m.in_features, m.out_features) for names, m in linears(model) if "lm_head" not in names[0]}
    return sorted(shapes)


def whole_model(model, tokenizer, info, windows: int, threshold: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as cache:
        os.environ["LOWBIT_CACHE"] = cache  # a private cache: nothing read from an earlier run
        evaluation = Evaluation(info, tokenizer, lambda: model, windows=windows, progress=False)
        ids = evaluation.reference.ids

        def forward():
            with torch.inference_mode():
                for window in ids:
                    model(window[None])

        reference = median_seconds(forward, budget=0, most=3)
        quantized = copy.deepcopy(model)
        run(quantized, QuantPlan.uniform(f"int8_outlier/{threshold:g}"), progress=False)
        materialize(quantized)
        score = median_seconds(lambda: evaluation.score(quantized), budget=0, most=3)
        theirs = bnb_model(model, threshold)
        with torch.inference_mode():
            window = ids[:1]
            logits = {name: m(window).logits.float().log_softmax(-1) for name, m in
                      (("fp32", model), ("lowbit", quantized), ("bnb", theirs))}
        kl = {name: (logits["fp32"].exp() * (logits["fp32"] - logits[name])).sum(-1).mean().item()
              for name in ("lowbit", "bnb")}
    return {"fp32 forward": reference, "int8_outlier score": score, "tokens": ids.numel(), "kl": kl}


def bnb_model(model, threshold: float):
    """A copy of ``model`` with every linear layer but the head a bitsandbytes ``Linear8bitLt``."""
    theirs = copy.deepcopy(model)
    for names, lin in linears(theirs):
        if "lm_head" in names[0]:
            continue
        layer = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    has_fp16_weights=False, threshold=threshold)
        layer.load_state_dict(lin.state_dict())
        layer = layer.to("cpu").eval()
        for name in names:
            parent, _, child = name.rpartition(".")
            setattr(theirs.get_submodule(parent), child, layer)
    return theirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="as lowbit compare --model (default: embedded SmolLM2)")
    ap.add_argument("--windows", type=int, default=2, help="512-token windows of the whole-model timing")
    ap.add_argument("--threshold", type=float, default=6.0)
    args = ap.parse_args()
    # bitsandbytes logs that it casts the activations to float16 (the docstring says so) on every call
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    console = make_console()
    model, tokenizer, info = load(args.model, console)
    path = "torch._int_mm" if native_int_mm(torch.device("cpu")) else "fp32 on exact column slices"
    rows = layer_rows([*model_shapes(model), BIG], args.threshold)

    table = Table(title=f"one layer, ms per call ({torch.get_num_threads()} threads, "
                        f"{torch.backends.cpu.get_cpu_capability()}: int8 product by {path})")
    for col in ("in x out", "tokens", "fp32", "int8_outlier", "packed", "bnb 8bit", "vs fp32", "vs bnb"):
        table.add_column(col, justify="left" if col == "in x out" else "right")
    for shape, tokens, t in rows:
        table.add_row(shape, str(tokens), *(f"{t[k] * 1e3:.3f}" for k in ("fp32", "lowbit", "packed", "bnb")),
                      f"{t['lowbit'] / t['fp32']:.2f}x", f"{t['lowbit'] / t['bnb']:.2f}x")
    console.print(table)

    w = whole_model(model, tokenizer, info, args.windows, args.threshold)
    console.print(f"{info.name}, {args.windows} windows x 512 tokens: fp32 forward {w['fp32 forward']:.2f} s, "
                  f"int8_outlier score {w['int8_outlier score']:.2f} s "
                  f"({w['int8_outlier score'] / w['fp32 forward']:.2f}x the fp32 forward)")
    console.print(f"KL mean to the fp32 original, first window: lowbit int8_outlier {w['kl']['lowbit']:.5f}, "
                  f"bitsandbytes Linear8bitLt {w['kl']['bnb']:.5f}")


if __name__ == "__main__":
    main()
