"""Batch-1 decode and 512-token prefill speed on the embedded SmolLM2-135M, lowbit against its peers.

    .venv/bin/python benchmarks/bench_decode.py [--new-tokens 64] [--repeat 3] [--threads 2] [--json F]
                                                [--rows ROW,ROW] [--head same|fp32]

Rows, each measured in a fresh process (so its peak memory is its own):

- "transformers fp32": the original model, transformers' ``generate()`` (the model lowbit replaces).
- "lowbit fp32": the same weights through ``lowbit.generate`` (the native decode step, dense rows).
- "lowbit q4_0 / nf4 / int4 / int8": every linear layer quantized (with ``--head same``, the default,
  the tied output head too, in the same format, as llama.cpp does; ``--head fp32`` keeps it) by
  ``lowbit quantize`` into a directory, loaded from it (no float32 copy is ever built) and run by
  ``lowbit.generate``: fused kernels reading the packed bytes.
- "bitsandbytes nf4": every decoder linear layer as bitsandbytes' ``Linear4bit`` (nf4, fp32 compute) on
  the CPU, transformers' ``generate()`` (the output head stays fp32: bitsandbytes skips it).
- "llama.cpp q4_0": the lowbit q4_0 directory exported by ``lowbit export --to gguf`` and run by
  llama-cpp-python (same bytes), if it is installed.

Decode tokens/s: greedy, ``--new-tokens`` after a short prompt, the median of ``--repeat`` runs, the
first new token (it comes from the prefill) not counted. Prefill tokens/s: one 512-token prompt from the
default text, median of ``--repeat``. Peak memory: the process's high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` once the model is loaded) over the runs, less the resident size of the process
before the model was loaded (Python, torch, transformers, lowbit imported). Ratios are from this run only.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROWS = ("transformers fp32", "lowbit fp32", "lowbit q4_0", "lowbit nf4", "lowbit int4", "lowbit int8",
        "bitsandbytes nf4", "llama.cpp q4_0")
PROMPT = "The history of the city begins"
FOUR_BIT = ("lowbit q4_0", "lowbit nf4", "lowbit int4")
TARGET_TPS = 60.0  # issue 10: 4-bit decode >= 60 tokens/s, >= 4x fp32, >= 8x bitsandbytes, >= 0.45x llama.cpp


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    return float("nan")


_BASE_MB = 0.0


def reset_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to VmRSS (Linux >= 4.0)


def prompt_ids(tokenizer, n: int) -> torch.Tensor:
    from lowbit.eval.protocol import default_text

    return tokenizer(default_text(), return_tensors="pt").input_ids[0, :n]


def measure_one(row: str, args) -> dict:
    """Runs in the child process: build the row's model, time it, report."""
    import transformers  # noqa: F401  (imported before the baseline is read)

    import lowbit.generation  # noqa: F401
    from lowbit.models import load_model

    global _BASE_MB
    torch.set_num_threads(args.threads)
    _BASE_MB = rss_mb("VmRSS")
    if row == "llama.cpp q4_0":
        return _llama_cpp(args)
    if args.dir:  # a quantized directory: only the tokenizer of the original is needed
        from lowbit.io.model_io import load_quantized

        model, tokenizer, _ = load_quantized(args.dir)
        long_ids = prompt_ids(tokenizer, 512)
        return _lowbit(row, model, tokenizer, long_ids, args)
    model, tokenizer, _ = load_model(None)
    long_ids = prompt_ids(tokenizer, 512)
    if row.startswith("lowbit"):
        return _lowbit(row, model, tokenizer, long_ids, args)
    if row == "transformers fp32":
        return _transformers(model, tokenizer, long_ids, args)
    return _transformers(_bnb(model), tokenizer, long_ids, args)


def _settle():
    import ctypes

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed pages otherwise: RSS would not drop
    reset_peak()


def _lowbit(row, model, tokenizer, long_ids, args) -> dict:
    from lowbit.generation import LlamaStepper, generate
    from lowbit.layers.surgery import model_weight_bytes

    _settle()
    prefill = []
    for _ in range(args.repeat):
        step = LlamaStepper(model, long_ids.numel() + 1)
        start = time.perf_counter()
        step(long_ids)
        prefill.append(time.perf_counter() - start)
    decode, stepper = [], ""
    generate(model, tokenizer, PROMPT, 4, stop_at_eos=False)  # warm-up
    for _ in range(args.repeat):
        g = generate(model, tokenizer, PROMPT, args.new_tokens, stop_at_eos=False)
        decode.append(g.decode_tokens_per_second)
        stepper = g.stepper
    return _result(row, statistics.median(decode), long_ids.numel() / statistics.median(prefill),
                   model_weight_bytes(model), stepper)


def _transformers(model, tokenizer, long_ids, args) -> dict:
    from lowbit.layers.surgery import model_weight_bytes

    _settle()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    prefill, decode = [], []
    with torch.inference_mode():
        model(long_ids[None])  # warm-up
        for _ in range(args.repeat):
            start = time.perf_counter()
            model(long_ids[None])
            prefill.append(time.perf_counter() - start)
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        for _ in range(args.repeat):
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            one = time.perf_counter() - start
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
            decode.append((args.new_tokens - 1) / (time.perf_counter() - start - one))
    return _result("", statistics.median(decode), long_ids.numel() / statistics.median(prefill),
                   model_weight_bytes(model), "transformers generate()")


def _bnb(model):
    """Every decoder nn.Linear as bitsandbytes' Linear4bit nf4 (blocksize 64), quantized on the CPU."""
    import bitsandbytes as bnb

    for _, module in list(model.model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.float32, quant_type="nf4")
                layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                                 blocksize=64)
                layer = layer.to("cpu")  # Params4bit quantizes on its first move to a device
                setattr(module, child_name, layer)
    return model


def _llama_cpp(args) -> dict:
    import numpy as np
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.dir, local_files_only=True)
    long_ids = prompt_ids(tokenizer, 512)
    path = Path(args.gguf)
    size = path.stat().st_size
    llm = Llama(str(path), n_ctx=1024, n_threads=args.threads, n_threads_batch=args.threads, n_batch=512,
                verbose=False)
    _settle()
    prefill, decode = [], []
    ids = tokenizer(PROMPT).input_ids
    for _ in range(args.repeat):
        llm.reset()
        start = time.perf_counter()
        llm.eval(long_ids.tolist())
        prefill.append(time.perf_counter() - start)
    for _ in range(args.repeat + 1):  # the first run warms up
        llm.reset()
        llm.eval(ids)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        start = time.perf_counter()
        for _ in range(args.new_tokens - 1):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        decode.append((args.new_tokens - 1) / (time.perf_counter() - start))
    return _result("", statistics.median(decode[1:]), long_ids.numel() / statistics.median(prefill), size,
                   "llama-cpp-python")


def _result(row, decode, prefill, weight_bytes, how) -> dict:
    return {"row": row, "decode_tps": decode, "prefill_tps": prefill, "peak_rss_mb": rss_mb("VmHWM") - _BASE_MB,
            "weight_mb": weight_bytes / 1e6, "how": how}


def lowbit_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *map(str, args)], capture_output=True, text=True)


def prepare_row(row: str, args, tmp: Path) -> list[str]:
    """Quantize (and export) in a process of its own: the measured one loads the result."""
    fmt = "q4_0" if row == "llama.cpp q4_0" else row.split()[1]
    if fmt == "fp32" or row in ("transformers fp32", "bitsandbytes nf4"):
        return []
    out = tmp / fmt
    if not out.exists():
        rules = ([] if args.head == "same" else [{"pattern": "lm_head", "keep": True}]) + [
            {"pattern": "*", "format": fmt}]
        plan = tmp / f"{fmt}.json"
        plan.write_text(json.dumps({"rules": rules}))
        done = lowbit_cli("quantize", "--plan", plan, "-o", out)
        if done.returncode:
            raise RuntimeError(done.stderr.strip().splitlines()[-1])
    extra = ["--dir", str(out)]
    if row == "llama.cpp q4_0":
        gguf = tmp / "q4_0.gguf"
        done = lowbit_cli("export", out, "--to", "gguf", "-o", gguf)
        if done.returncode:
            raise RuntimeError(done.stderr.strip().splitlines()[-1])
        extra += ["--gguf", str(gguf)]
    return extra


def run_row(row: str, args, tmp: Path) -> dict:
    try:
        extra = prepare_row(row, args, tmp)
    except RuntimeError as e:
        return {"row": row, "error": str(e)}
    cmd = [sys.executable, __file__, "--one", row, "--new-tokens", str(args.new_tokens), "--repeat",
           str(args.repeat), "--threads", str(args.threads), "--head", args.head, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"row": row, "error": tail}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["row"] = row
    return result


def report(results: list[dict], args) -> None:
    from rich.console import Console
    from rich.table import Table

    by = {r["row"]: r for r in results if "error" not in r}
    fp32 = by.get("transformers fp32")
    table = Table(title=f"batch-1 decode and 512-token prefill, SmolLM2-135M, {args.threads} threads "
                        f"({args.new_tokens} new tokens, median of {args.repeat})")
    for h in ("row", "decode tok/s", "prefill tok/s", "weights MB", "peak MB", "peak / fp32", "how"):
        table.add_column(h, justify="left" if h in ("row", "how") else "right")
    for r in results:
        if "error" in r:
            table.add_row(r["row"], "-", "-", "-", "-", "-", f"not measured: {r['error']}")
            continue
        ratio = f"{r['peak_rss_mb'] / fp32['peak_rss_mb']:.2f}" if fp32 else "-"
        table.add_row(r["row"], f"{r['decode_tps']:.1f}", f"{r['prefill_tps']:.1f}", f"{r['weight_mb']:.1f}",
                      f"{r['peak_rss_mb']:.0f}", ratio, r["how"])
    console = Console(width=max(Console().width, 150))
    console.print(table)
    peers = {"transformers fp32": 4.0, "lowbit fp32": None, "bitsandbytes nf4": 8.0, "llama.cpp q4_0": 0.45}
    for row in FOUR_BIT:
        if row not in by:
            continue
        r = by[row]
        parts = [f"{row}: {r['decode_tps']:.1f} tok/s (target >= {TARGET_TPS:.0f})"]
        for peer, target in peers.items():
            if peer in by:
                x = r["decode_tps"] / by[peer]["decode_tps"]
                parts.append(f"{x:.2f}x {peer}" + (f" (target >= {target}x)" if target else ""))
        if fp32:
            parts.append(f"prefill {r['prefill_tps'] / fp32['prefill_tps']:.2f}x transformers fp32 (target >= 1)")
        console.print("; ".join(parts), highlight=False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--head", choices=("same", "fp32"), default="same",
                   help="the output head of quantized rows: in the row's format (default) or fp32")
    p.add_argument("--rows", help=f"comma-separated subset of: {', '.join(ROWS)}")
    p.add_argument("--json", metavar="F", help="write the rows as JSON")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--gguf", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one, args)))
        return 0
    rows = ROWS if not args.rows else tuple(r.strip() for r in args.rows.split(","))
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows:
            print(f"measuring {row} ...", file=sys.stderr, flush=True)
            results.append(run_row(row, args, Path(tmp)))
    report(results, args)
    if args.json:
        from lowbit.files.atomic import write_json

        write_json(args.json, {"threads": args.threads, "new_tokens": args.new_tokens, "repeat": args.repeat,
                               "head": args.head, "rows": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
