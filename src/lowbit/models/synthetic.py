"""Synthetic Llama-architecture checkpoints of a chosen shape, for tests and benchmarks at the sizes people
quantize (issue 27): sharded safetensors with an index, config.json and the embedded SmolLM2's tokenizer,
in the layout ``save_pretrained`` writes, so lowbit and transformers load them as they load a real model.

Written shard by shard: each tensor is made on its own, a shard is saved as soon as its tensors are made
and then dropped, so memory holds one shard at most (``--shard-size``), never the model. The directory
appears whole or not at all (``files.atomic.atomic_dir``).

Two ways to fill the weights:

- ``random``: normal with std 0.02 (``initializer_range``, the Llama configs' value), RMSNorm weights 1.
  Each tensor has its own generator, seeded from the seed and the tensor's name, so its values do not
  depend on the shard size or on which other tensors are written.
- ``tile``: each tensor is the embedded SmolLM2's tensor of the same role (layer ``i`` from SmolLM2's layer
  ``i % 30``; an untied ``lm_head`` from its tied embedding) repeated to the target shape: target
  ``[i, j]`` = source ``[i % rows, j % cols]``. Gaussian weights have none of what makes real ones hard to
  quantize: heavy tails, input channels that are large in every row (outlier features), rows on different
  scales; every block of a Gaussian matrix looks alike, and NF4 (built for normal weights) looks better on
  it than on a trained model. Tiling keeps each tensor's histogram and its per-channel structure: SmolLM2's
  rows hold 576 or 1536 weights, multiples of 64, so every block of 16, 32 or 64 weights along a row is one
  of SmolLM2's own blocks, and an outlier column ``j`` comes back at every ``j + k * 576``. Measured on
  layer 5's q_proj and down_proj tiled to 2048x2048 and 2048x8192: kurtosis (4.6, 3.4), largest column
  magnitude over the median column's (2.8, 4.5) and the SQNR of nf4, q4_0 and int4 are SmolLM2's own to
  0.02 dB; Gaussian weights have kurtosis 3.0, a column ratio of 1.4-1.5, and 0.1-0.6 dB more SQNR. What it cannot
  give: statistics of its own to a larger model (outlier features grow with model size, LLM.int8(),
  Dettmers et al. 2022), and rank (a tiled matrix has the rank of its source). And the embedded SmolLM2
  ships as Q4_1 (``models.loader``): each 32-weight block of the source holds at most 16 distinct values
  on a grid, so a format with 32-weight blocks and an offset (q4_1, int4_asym/32) finds that grid again
  and scores unrealistically well on tiled weights; compare formats on them with that in mind.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import product
from math import prod
from pathlib import Path

import torch

from ..cachedir import check_space
from ..errors import InputError, ModelLoadError
from ..files.atomic import atomic_dir, check_output_dir, save_tensors, write_errors

INITS = ("random", "tile")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
STD = 0.02  # LlamaConfig's initializer_range default, and the value in every config cited below
DEFAULT_SHARD_SIZE = 2 * 10**9
# huggingface_hub's units (serialization/_base.py SIZE_UNITS), the ones save_pretrained(max_shard_size=) reads
_SIZE_UNITS = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
# copied from SmolLM2's converted-model cache: the tokenizer files save_pretrained wrote there, and
# generation_config.json, whose special ids are the tokenizer's
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# the config of Llama 3.2 (1B, 3B): rope scaled for a 128k context, as their config.json files give it
_LLAMA32_ROPE = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                 "original_max_position_embeddings": 8192, "rope_type": "llama3"}


@dataclass(frozen=True)
class Shape:
    """A Llama-architecture model's sizes: what config.json says and the tensors' shapes follow from."""

    hidden: int
    layers: int
    mlp: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    rope_theta: float = 500000.0
    max_positions: int = 8192
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5


PRESETS = {
    # a few MB, for tests: SmolLM2's vocabulary (its tokenizer's ids all fit), an untied head like 8b's
    "tiny": Shape(hidden=32, layers=2, mlp=64, heads=4, kv_heads=2, vocab=49152, tied=False),
    # the embedded SmolLM2-135M's own shapes (tests/models/test_synthetic.py checks them against its config)
    "smollm2": Shape(hidden=576, layers=30, mlp=1536, heads=9, kv_heads=3, vocab=49152, tied=True,
                     rope_theta=100000.0),
    # Llama-3.2-1B and -3B: meta-llama/Llama-3.2-1B and -3B config.json, as copied unchanged to
    # https://huggingface.co/Emm9625/Llama-3.2-1B-chatml/blob/main/config.json (a duplicate of
    # unsloth/Llama-3.2-1B, "_name_or_path": "meta-llama/Llama-3.2-1B") and
    # https://huggingface.co/mlx-community/Llama-3.2-3B-bf16/blob/refs%2Fpr%2F1/config.json
    "1b": Shape(hidden=2048, layers=16, mlp=8192, heads=32, kv_heads=8, vocab=128256, tied=True,
                max_positions=131072, rope_scaling=_LLAMA32_ROPE),
    "3b": Shape(hidden=3072, layers=28, mlp=8192, heads=24, kv_heads=8, vocab=128256, tied=True,
                max_positions=131072, rope_scaling=_LLAMA32_ROPE),
    # Llama-3-8B: meta-llama/Meta-Llama-3-8B config.json, as copied to
    # https://huggingface.co/pandyamarut/Meta-Llama-3-8B/blob/3689724debf35846edda50e9442887aa41c7157c/config.json
    "8b": Shape(hidden=4096, layers=32, mlp=14336, heads=32, kv_heads=8, vocab=128256, tied=False),
}


def check_shape(shape: Shape) -> None:
    """A one-line InputError for sizes no Llama model can have."""
    for name in ("hidden", "layers", "mlp", "heads", "kv_heads", "vocab"):
        value = getattr(shape, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InputError(f"{name.replace('_', '-')} must be a positive integer, not {value!r}")
    if shape.hidden % shape.heads:
        raise InputError(f"heads ({shape.heads}) must divide hidden ({shape.hidden}): each head gets hidden / heads")
    if shape.heads % shape.kv_heads:
        raise InputError(f"kv-heads ({shape.kv_heads}) must divide heads ({shape.heads}): grouped-query attention "
                         "shares each key/value head among heads / kv-heads query heads")
    if (shape.hidden // shape.heads) % 2:
        raise InputError(f"hidden / heads ({shape.hidden // shape.heads}) must be even: rotary embeddings "
                         "rotate pairs of a head's dimensions")


def layout(shape: Shape) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, in the order of LlamaForCausalLM's state dict (the order save_pretrained shards in)."""
    head_dim = shape.hidden // shape.heads
    kv = shape.kv_heads * head_dim
    per_layer = {
        "self_attn.q_proj.weight": (shape.hidden, shape.hidden),
        "self_attn.k_proj.weight": (kv, shape.hidden),
        "self_attn.v_proj.weight": (kv, shape.hidden),
        "self_attn.o_proj.weight": (shape.hidden, shape.hidden),
        "mlp.gate_proj.weight": (shape.mlp, shape.hidden),
        "mlp.up_proj.weight": (shape.mlp, shape.hidden),
        "mlp.down_proj.weight": (shape.hidden, shape.mlp),
        "input_layernorm.weight": (shape.hidden,),
        "post_attention_layernorm.weight": (shape.hidden,),
    }
    names = {"model.embed_tokens.weight": (shape.vocab, shape.hidden)}
    for i in range(shape.layers):
        names.update({f"model.layers.{i}.{suffix}": dims for suffix, dims in per_layer.items()})
    names["model.norm.weight"] = (shape.hidden,)
    if not shape.tied:
        names["lm_head.weight"] = (shape.vocab, shape.hidden)
    return names


def config(shape: Shape, dtype: torch.dtype, tokens: dict) -> dict:
    """config.json as the Llama 3 checkpoints on the hub have it; ``tokens``: the tokenizer's special ids."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        **tokens,
        "head_dim": shape.hidden // shape.heads,
        "hidden_act": "silu",
        "hidden_size": shape.hidden,
        "initializer_range": STD,
        "intermediate_size": shape.mlp,
        "max_position_embeddings": shape.max_positions,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": shape.heads,
        "num_hidden_layers": shape.layers,
        "num_key_value_heads": shape.kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_scaling": shape.rope_scaling,
        "rope_theta": shape.rope_theta,
        "tie_word_embeddings": shape.tied,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
        "vocab_size": shape.vocab,
    }


def parse_size(text: str) -> int:
    """Bytes in ``text``: a number with an optional unit KB, MB, GB or TB (powers of 10, as save_pretrained's
    ``max_shard_size`` reads them), e.g. "2GB", "500MB", "1000000"."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]B)?\s*", text, re.IGNORECASE)
    size = int(float(m[1]) * _SIZE_UNITS[(m[2] or "").upper()]) if m else 0
    if size <= 0:
        raise InputError(f"not a positive size: {text!r} (a number of bytes, or with KB, MB, GB or TB: '2GB')")
    return size


def write_checkpoint(out: str | Path, shape: Shape, *, init: str = "random", seed: int = 0,
                     dtype: torch.dtype = torch.bfloat16, shard_size: int = DEFAULT_SHARD_SIZE,
                     progress: Callable[[str], None] | None = None) -> Path:
    """Write a checkpoint of ``shape`` to the new directory ``out`` (an existing empty one is replaced) and
    return its path. ``progress`` gets one line per shard written (name, bytes, seconds)."""
    check_shape(shape)
    if init not in INITS:
        raise InputError(f"unknown init {init!r}; one of {', '.join(INITS)}")
    if dtype not in DTYPES.values():
        raise InputError(f"unsupported dtype {dtype}; one of {', '.join(DTYPES)}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size <= 0:
        raise InputError(f"shard size must be a positive number of bytes, not {shard_size!r}")
    out = Path(out)
    replacing = _check_out(out)
    from huggingface_hub import split_torch_state_dict_into_shards

    dims = layout(shape)
    # meta tensors: the split needs only shapes and dtypes, and allocates nothing
    split = split_torch_state_dict_into_shards({n: torch.empty(d, dtype=dtype, device="meta") for n, d in dims.items()},
                                               max_shard_size=shard_size)
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = {n: itemsize * prod(d) for n, d in dims.items()}
    largest_shard = max(sum(nbytes[n] for n in names) for names in split.filename_to_tensors.values())
    check_space("the checkpoint", disk=split.metadata["total_size"], memory=largest_shard + max(nbytes.values()),
                directory=out.absolute().parent, hint="choose a smaller shape or --shard-size, or another directory")
    embedded = smollm2_dir()
    with ExitStack() as stack:
        make = _random(seed, dtype)
        if init == "tile":
            from safetensors import safe_open

            make = _tiled(stack.enter_context(safe_open(embedded / "model.safetensors", "pt")), dtype)
        tmp = stack.enter_context(atomic_dir(out, overwrite=replacing, replaceable=_is_empty))
        for filename, names in split.filename_to_tensors.items():
            start = time.perf_counter()
            shard = {name: make(name, dims[name]) for name in names}
            with write_errors(tmp / filename):
                save_tensors(shard, tmp / filename)
            del shard  # before the next shard is made: memory holds one at a time
            if progress is not None:
                seconds, size = time.perf_counter() - start, (tmp / filename).stat().st_size
                progress(f"{filename}: {len(names)} tensors, {size / 1e6:,.1f} MB in {seconds:.1f} s "
                         f"({size / 1e6 / max(seconds, 1e-6):,.0f} MB/s)")
        if split.is_sharded:
            index = {"metadata": {"total_parameters": sum(prod(d) for d in dims.values()), **split.metadata},
                     "weight_map": split.tensor_to_filename}
            _write_json(tmp / "model.safetensors.index.json", index)
        embedded_config = json.loads((embedded / "config.json").read_text(encoding="utf-8"))
        tokens = {k: embedded_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if k in embedded_config}
        _write_json(tmp / "config.json", config(shape, dtype, tokens))
        for name in TOKENIZER_FILES:
            if (embedded / name).is_file():
                shutil.copyfile(embedded / name, tmp / name)
    return out


def smollm2_dir() -> Path:
    """The embedded SmolLM2 converted to float32 safetensors, with its config and tokenizer files: the
    converted-model cache (``models.converted``), made by loading the model once if it is not there yet."""
    from . import converted
    from .hashing import files_sha256
    from .loader import load_model, resolve

    _, gguf = resolve(None)
    sha256 = files_sha256([Path(gguf)])
    found = converted.lookup(sha256, quiet=True)
    if found is None:
        load_model(None)  # converts the GGUF file and stores the result in the cache
        found = converted.lookup(sha256)
    if found is None:
        raise ModelLoadError("the embedded SmolLM2's converted-model cache could not be written (see the warning "
                             "above); set LOWBIT_CACHE to a writable directory")
    return found


def _random(seed: int, dtype: torch.dtype) -> Callable[[str, tuple[int, ...]], torch.Tensor]:
    def make(name: str, dims: tuple[int, ...]) -> torch.Tensor:
        if len(dims) == 1:  # RMSNorm weights: transformers initializes them to 1
            return torch.ones(dims, dtype=dtype)
        # a seed per name (sha256: Python's hash() differs between runs); normal_ draws in float32 and rounds,
        # so the values are the same float32 draws in every dtype
        digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        return torch.empty(dims, dtype=dtype).normal_(0.0, STD, generator=generator)

    return make


def _tiled(source, dtype: torch.dtype) -> Callable[[str, tuple[int, ...]], torch.Tensor]:
    """``make`` for tile mode; ``source``: SmolLM2's safetensors file, open."""
    names = set(source.keys())
    layers = 1 + max(int(m[1]) for m in map(_LAYER.fullmatch, names) if m)

    def make(name: str, dims: tuple[int, ...]) -> torch.Tensor:
        m = _LAYER.fullmatch(name)
        if m:
            name = f"model.layers.{int(m[1]) % layers}.{m[2]}"
        elif name == "lm_head.weight" and name not in names:
            name = "model.embed_tokens.weight"  # SmolLM2 ties its head to the embedding
        return tile(source.get_tensor(name).to(dtype), dims)

    return make


def tile(source: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``source`` repeated (and cut) to ``dims``: out[i, j] = source[i % rows, j % cols], any number of
    dimensions. Copied block by block into the output: nothing larger than it is allocated."""
    out = torch.empty(dims, dtype=source.dtype)
    for corner in product(*(range(0, n, s) for n, s in zip(dims, source.shape, strict=True))):
        sizes = [min(s, n - c) for c, s, n in zip(corner, source.shape, dims, strict=True)]
        out[tuple(slice(c, c + k) for c, k in zip(corner, sizes, strict=True))] = source[tuple(slice(k) for k in sizes)]
    return out


def _check_out(out: Path) -> bool:
    """Whether ``out`` exists (an empty directory, which the new one replaces); a one-line InputError for
    anything else there."""
    replacing = out.is_dir() and not out.is_symlink()  # a symbolic link: check_output_dir says why not
    if replacing and not _is_empty(out):
        raise InputError(f"output directory is not empty: {out}; name a new or an empty one")
    if out.exists() and not out.is_dir():
        raise InputError(f"output exists and is not a directory: {out}")
    check_output_dir(out, overwrite=replacing)  # where it can be made: outside the cache, in a writable directory
    return replacing


def _is_empty(path: Path) -> bool:
    return not any(path.iterdir())


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")

