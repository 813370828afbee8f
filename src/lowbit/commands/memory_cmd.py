"""`lowbit memory`: weight memory at each format, and which accelerators hold it.

The numbers come from lowbit.memory (measured bits per weight, vendor memory sizes, the
documented tensor-core types); this module parses arguments and prints tables.
"""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Group
from rich.table import Table
from rich.text import Text

from .. import limits as L
from .. import memory as mem
from ..errors import InputError
from ..files.atomic import write_json
from .common import check_writable_file, console, load


def add_parser(sub) -> None:
    p = sub.add_parser("memory")
    what = p.add_argument_group("the model (one of)")
    what.add_argument("--params", metavar="N",
                      help=f"parameter count: {mem.PARAMS_FORMS}; a whole count {L.PARAMS.text()}")
    what.add_argument("--model", metavar="M", help="count a model's parameters: 'smollm2' (embedded), 'minilm', "
                                                   "a local HF directory, a .gguf file, or a hub id")
    p.add_argument("--reserve", type=float, default=mem.DEFAULT_RESERVE, metavar="SHARE",
                   help="share of each device's memory held back for activations (and the KV cache unless "
                        f"--context counts it), in [0, 1); default {mem.DEFAULT_RESERVE}")
    kv = p.add_argument_group("KV cache (counted only with --context)")
    kv.add_argument("--context", type=L.CONTEXT.arg("--context"), metavar="TOKENS",
                    help=f"tokens per sequence held in the KV cache ({L.CONTEXT.text()})")
    kv.add_argument("--batch", type=L.BATCH.arg("--batch"), metavar="N",
                    help=f"sequences held at once (default 1; {L.BATCH.text()})")
    kv.add_argument("--kv-dtype", choices=tuple(mem.KV_BYTES), default="bf16", help="KV-cache element type")
    kv.add_argument("--layers", type=L.LAYERS.arg("--layers"), metavar="N",
                    help=f"decoder layers (default: the --model config's; {L.LAYERS.text()})")
    kv.add_argument("--kv-heads", type=L.KV_HEADS.arg("--kv-heads"), metavar="H",
                    help=f"key/value heads (default: the --model config's; {L.KV_HEADS.text()})")
    kv.add_argument("--head-dim", type=L.HEAD_DIM.arg("--head-dim"), metavar="D",
                    help=f"dimension per head (default: the --model config's; {L.HEAD_DIM.text()})")
    p.add_argument("--apple", action="store_true", help="also show Apple M3 Max and M2 Ultra (unified memory)")
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    if (args.params is None) == (args.model is None):
        raise InputError("give the model as --params N (e.g. 70B) or --model M, one of the two")
    mem.check_reserve(args.reserve)
    shape_flags = {"--layers": args.layers, "--kv-heads": args.kv_heads, "--head-dim": args.head_dim}
    if args.context is None and (args.batch is not None or any(v is not None for v in shape_flags.values())):
        raise InputError("--batch, --layers, --kv-heads and --head-dim describe the KV cache: give --context too")
    missing = [flag for flag, v in shape_flags.items() if v is None]
    if args.context is not None and args.params is not None and missing:
        raise InputError(f"--context with --params needs the attention shape: give {', '.join(missing)} "
                         "(or --model, whose config has it)")
    if args.json:
        check_writable_file(args.json)
    if args.json and args.model is not None:  # never over the model it counts (imported here: --params loads no torch)
        from ..files.outputs import check_outputs
        from ..io.model_io import local_source

        check_outputs([args.json], [local_source(args.model)])
    params = None if args.params is None else mem.parse_params(args.params)  # before a --model loads, too

    con = console()
    if params is not None:
        counted = f"--params {args.params.strip()}"
        config = None
    else:
        params, counted, config = _count_model(args.model, con)
    kv = None
    if args.context is not None:
        given = (args.layers, args.kv_heads, args.head_dim)
        # flags override the config; kv_shape raises one line naming the flags when the config lacks it
        default = mem.kv_shape(config) if None in given else given
        shape = tuple(g if g is not None else d for g, d in zip(given, default, strict=True))
        kv = mem.KVCache(*shape, args.context, 1 if args.batch is None else args.batch, args.kv_dtype)
    accelerators = mem.ACCELERATORS + (mem.APPLE if args.apple else ())
    rows = mem.weight_memory(params, kv)

    con.print(Group(memory_table(rows, params, counted, kv), fit_table(rows, accelerators, args.reserve, kv),
                    hardware_table(accelerators)))
    if args.json:
        write_json(args.json, to_json(rows, params, counted, kv, accelerators, args.reserve))
        con.print(f"wrote {args.json}")
    return 0


def _count_model(spec: str, con):
    """Every parameter of the model (tied tensors once), what was counted, and the model's config.

    A local directory of safetensors files is counted from the files' headers, so a 70B checkpoint
    needs no memory; a GGUF file or a hub id is loaded."""
    from torch import nn

    from ..models.loader import resolve  # imports torch: not for --params (issue 25, fast start)

    how, target = resolve(spec)
    shards = sorted(Path(target).glob("*.safetensors")) if how == "directory" else []
    if shards:
        from safetensors import safe_open
        from transformers import AutoConfig

        total = 0
        for shard in shards:
            with safe_open(shard, framework="pt") as f:
                slices = [f.get_slice(name) for name in f.keys()]  # noqa: SIM118 (safe_open is no dict)
            # float tensors are the weights; integer ones are buffers such as BERT's position_ids
            total += sum(math.prod(s.get_shape()) for s in slices if s.get_dtype().startswith(("F", "BF")))
        counted = (f"every float tensor stored in {len(shards)} safetensors file{'s' * (len(shards) > 1)} of {spec}, "
                   "read from their headers (nothing loaded), all at each format; `lowbit quantize` keeps "
                   "embeddings, norms and lm_head in float by default, so its checkpoints are larger")
        return total, counted, AutoConfig.from_pretrained(target)
    model, _, info = load(spec, con)
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    embedding = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    params = list(model.parameters())  # shared (tied) parameters come once
    total = sum(p.numel() for p in params)
    in_linear = sum(p.numel() for p in params if id(p) in linear)
    tied = sum(p.numel() for p in params if id(p) in linear and id(p) in embedding)
    counted = (f"all parameters of {info.source}: nn.Linear weights {in_linear:,}"
               + (f" (of which {tied:,} shared with the token embedding)" if tied else "")
               + f" + everything else (embeddings, norms, biases) {total - in_linear:,}, all at each format; "
               "`lowbit quantize` keeps embeddings, norms and lm_head in float by default, so its checkpoints "
               "are larger")
    return total, counted, model.config


def _gb(nbytes: float) -> str:
    gb = nbytes / mem.GB
    return f"{gb:,.1f}" if gb >= 1 else f"{gb:#.3g}"  # "#": 0.190, not 0.19


def memory_table(rows, params: int, counted: str, kv) -> Table:
    table = Table(title="weight memory in decimal GB (1 GB = 1e9 bytes)", caption_justify="left",
                  caption=Text(f"{params:,} parameters ({counted}). bits/weight are measured from the bytes lowbit "
                               "stores for a 64 x 4096 tensor, block scales included; fp32 is an unquantized "
                               "float32 tensor"))
    for col, justify in [("format", "left"), ("label", "left"), ("bits/weight", "right"), ("weights GB", "right")]:
        table.add_column(col, justify=justify)
    if kv:
        table.add_column("+ KV cache GB", justify="right")
        table.add_column("total GB", justify="right")
    for r in rows:
        cells = [r.format, r.label, f"{r.bits_per_weight:.4g}", _gb(r.weight_bytes)]
        if kv:
            cells += [_gb(r.kv_bytes), _gb(r.total_bytes)]
        table.add_row(*cells)
    if kv:
        table.caption.append(
            f". KV cache: 2 (K, V) x {kv.layers} layers x {kv.kv_heads} KV heads x {kv.head_dim} head dim x "
            f"{kv.context:,} tokens x {kv.batch} sequence{'s' * (kv.batch != 1)} x {mem.KV_BYTES[kv.dtype]} "
            f"byte{'s' * (mem.KV_BYTES[kv.dtype] != 1)} ({kv.dtype}) = {kv.nbytes:,} bytes")
    return table


def fit_table(rows, accelerators, reserve: float, kv) -> Table:
    held = "activations" if kv else "activations + KV cache"
    table = Table(title=f"devices needed for the {'weights + KV cache' if kv else 'weights'}, "
                        f"{reserve:.0%} of memory held back for {held}", caption_justify="left")
    table.add_column("format")
    for a in accelerators:
        table.add_column(f"{a.name}\n{a.memory_gb:g} GB", justify="center")
    for r in rows:
        cells = []
        for a in accelerators:
            n = mem.devices_needed(r.total_bytes, a.memory_gb, reserve)
            cells.append(("yes" if n == 1 else f"{n}×") + ("*" if mem.native(r.format, a) else ""))
        table.add_row(r.format, *cells)
    software = ", ".join(f for f, path in mem.FORMAT_PATH.items() if path is None)
    table.caption = Text(
        f"yes: fits on one device; N×: needs at least N, the bytes split evenly (more in practice: replicated "
        f"layers, parallelism buffers). *: the device's tensor/matrix cores multiply this element type in "
        f"hardware (fp32: its FP32 units). {software} have no hardware path on any of these: their kernels "
        f"dequantize to bf16/fp16 in software. Device memory as vendors state it; sources: docs/hardware.md")
    return table


def hardware_table(accelerators) -> Table:
    table = Table(title="element types multiplied in hardware (tensor cores, matrix cores; docs/hardware.md)",
                  caption_justify="left")
    for col in ("device", "GB", "generation", *mem.FEATURES):
        table.add_column(col, justify="right" if col == "GB" else "left")
    mark = {True: "yes", False: "-", None: "?"}
    for a in accelerators:
        support = mem.NATIVE[a.generation]
        table.add_row(a.name, f"{a.memory_gb:g}", a.generation,
                      *(mark[support[f]] + ("†" if (a.generation, f) in mem.CAVEATS else "") for f in mem.FEATURES))
    notes = ["-: not among the vendor's listed tensor-core precisions"]
    if any(v is None for a in accelerators for v in mem.NATIVE[a.generation].values()):
        notes.append("?: not confirmed from a vendor source")
    shown = {a.generation for a in accelerators}
    notes += [f"† {text}" for (gen, _), text in mem.CAVEATS.items() if gen in shown]
    notes.append("int8/fp8 tensor cores take both operands in int8/fp8; weight-only kernels (bf16 activations) "
                 "dequantize the weights instead, and lowbit's per-block scales need a kernel that applies them")
    table.caption = Text("; ".join(notes))
    return table


def to_json(rows, params: int, counted: str, kv, accelerators, reserve: float) -> dict:
    return {
        "params": params,
        "params_counted": counted,
        "gb_bytes": mem.GB,
        "reserve": reserve,
        "kv_cache": None if kv is None else {
            "layers": kv.layers, "kv_heads": kv.kv_heads, "head_dim": kv.head_dim, "context": kv.context,
            "batch": kv.batch, "dtype": kv.dtype, "bytes": kv.nbytes},
        "formats": [{
            "format": r.format, "label": r.label, "bits_per_weight": r.bits_per_weight,
            "weight_bytes": r.weight_bytes, "kv_bytes": r.kv_bytes, "total_bytes": r.total_bytes,
            "devices_needed": {a.name: mem.devices_needed(r.total_bytes, a.memory_gb, reserve) for a in accelerators},
            "native": {a.name: mem.native(r.format, a) for a in accelerators},
        } for r in rows],
        "accelerators": [{"name": a.name, "memory_gb": a.memory_gb, "generation": a.generation,
                          "native": mem.NATIVE[a.generation]} for a in accelerators],
    }
