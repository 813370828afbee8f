"""Evaluation time of one format against a plain transformers forward over the same windows.

    .venv/bin/python benchmarks/bench_eval.py [--format nf4] [--windows 4] [--window 512] [--model M]

Phases, each timed on its own (wall seconds, median of --repeat where noted):

- "transformers forward": ``model(ids).logits`` per window of the original model, nothing
  else: the floor any evaluation pays.
- "lowbit score": what ``lowbit compare`` runs per format once the reference is cached:
  forward of the quantized model (materialized weights), log-softmax, KL over the full
  vocabulary against the cached reference, NLL, top-1. Target: at most 1.3x the forward.
- "lowbit score, packed": the same with every QuantLinear decoding its packed weight on
  each call (the memory-lean path, for information).

"reference (first run only)" is the one-off cost of the original's log-probs, cached
afterwards. Peak resident memory is the process's high-water mark (Linux ``VmHWM``), reset before each
phase through ``/proc/self/clear_refs`` where the kernel allows it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from rich.table import Table

from lowbit.commands.common import console as make_console
from lowbit.commands.common import load
from lowbit.evaluate import Evaluation, materialize
from lowbit.layers.linear import QuantLinear
from lowbit.planning import QuantPlan
from lowbit.workflows.run import run


def rss_mb(field: str) -> float:
    """``VmRSS`` or ``VmHWM`` (peak) of this process in MB, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    return float("nan")


def reset_peak() -> None:
    with contextlib.suppress(OSError):  # if not allowed, the peak covers everything before too
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to VmRSS (Linux >= 4.0)


def timed(fn, repeat: int) -> tuple[float, float]:
    """(median seconds, peak RSS MB) of ``fn()`` after one warm-up call."""
    fn()
    reset_peak()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), rss_mb("VmHWM")


def forward(model, ids) -> None:
    with torch.inference_mode():
        for window in ids:
            model(window[None])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="as lowbit compare --model (default: embedded SmolLM2)")
    ap.add_argument("--format", default="nf4", help="FORMAT[/BLOCK][+dq] (default nf4)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    plan = QuantPlan.uniform(args.format)
    console = make_console()
    model, tokenizer, info = load(args.model, console)
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as cache:
        # a private cache: the reference is computed here, not read from an earlier run's files
        os.environ["LOWBIT_CACHE"] = cache
        reset_peak()
        t0 = time.perf_counter()
        evaluation = Evaluation(info, tokenizer, lambda m=model: m, window=args.window, windows=args.windows,
                                progress=False)
        rows = {"reference (first run only)": (time.perf_counter() - t0, rss_mb("VmHWM"))}
        ids = evaluation.reference.ids
        rows["transformers forward (fp32 original)"] = timed(partial(forward, model, ids), args.repeat)
        run(model, plan, progress=False)  # in place: the original's weights are freed
        materialize(model)
        rows[f"lowbit score {plan.label}"] = timed(lambda: evaluation.score(model), args.repeat)
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.release()
        rows[f"lowbit score {plan.label}, packed"] = timed(lambda: evaluation.score(model), args.repeat)

    tokens = ids.numel()
    table = Table(title=f"{info.name}: {len(ids)} windows x {args.window} tokens, {torch.get_num_threads()} threads")
    for col in ["phase", "seconds", "tokens/s", "vs forward", "peak RSS MB"]:
        table.add_column(col, justify="left" if col == "phase" else "right")
    base = rows["transformers forward (fp32 original)"][0]
    for name, (seconds, peak) in rows.items():
        table.add_row(name, f"{seconds:.2f}", f"{tokens / seconds:,.0f}", f"{seconds / base:.2f}x", f"{peak:,.0f}")
    console.print(table)
    ratio = rows[f"lowbit score {plan.label}"][0] / base
    console.print(f"lowbit score / transformers forward: {ratio:.2f}x" + ("" if ratio <= 1.3 else
                                                                          "  (target 1.3x: MISSED)"))


if __name__ == "__main__":
    main()
