"""How much memory a model's weights take at each format, and which accelerators hold them.

Pure arithmetic and data tables; ``lowbit memory`` (commands/memory_cmd.py) prints them.
Bits per weight are measured, not nominal: a zero tensor is quantized to the label and its
stored bytes counted (``lowbit.formats.probe``), so block scales and second-level scales are in.
Sizes are decimal GB (1 GB = 1e9 bytes); a device's memory is the vendor's figure read in the same
unit, which for HBM parts (binary GB) errs on the safe side by up to 7% (docs/hardware.md#memory).
The hardware facts below are sourced in docs/hardware.md.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Context, Decimal
from functools import cache

from . import limits as L
from .errors import InputError

GB = 1e9  # decimal; vendors' HBM "GB" are often GiB, so a fit here is conservative (docs/hardware.md#memory)

# (name shown, label measured). fp8 is E4M3 in the OCP/NVIDIA "fn" encoding (finite, no infinities).
FORMATS = (
    ("fp32", "fp32"),
    ("bf16", "bf16"),
    ("fp8", "fp8_e4m3fn"),
    ("int8", "int8"),
    ("nf4", "nf4"),
    ("nf4+dq", "nf4+dq"),
    ("q4_0", "q4_0"),
    ("q4_k", "q4_k"),
    ("mxfp4", "mxfp4"),
    ("nvfp4", "nvfp4"),
    ("int2", "int2"),
)

# Bytes per K or V element of the KV cache.
KV_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "fp32": 4}

DEFAULT_RESERVE = 0.2  # share of device memory held back for activations (and the KV cache unless given)


@cache
def bits_per_weight(label: str) -> float:
    """Stored bits per weight of ``label`` (FORMAT or FORMAT+dq), scales included: the bytes the codecs
    store for a large tensor (lowbit.formats.probe), counted from the format facts without importing torch."""
    from .formats.facts import FP32_BITS
    from .formats.facts import bits_per_weight as stored_bits_per_weight
    from .formats.spec import DQ_SUFFIX

    if label == "fp32":
        return float(FP32_BITS)  # an unquantized float32 tensor: no scales
    name = label.removesuffix(DQ_SUFFIX)
    return stored_bits_per_weight(name, double_quant=name != label)


# --- parameter counts -------------------------------------------------------------------------

_SUFFIX = {"": 0, "k": 3, "m": 6, "b": 9, "t": 12}  # powers of ten
# digits (with an optional fraction and exponent) and an optional K/M/B/T; float() alone would
# also take "nan", "inf" and "1_000"
_PARAMS = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)(e[+-]?[0-9]+)?([kmbt]?)", re.IGNORECASE)
PARAMS_FORMS = "70B, 7b, 1.5B, 350M, 1.2T, 8e9 or 70000000000 (suffixes K, M, B, T)"


def parse_params(text: str) -> int:
    """``"70B"`` -> 70_000_000_000: a whole count from 1 to MAX_PARAMS (docs/limits.md), read exactly as a decimal
    (float read 1e30 as 1,000,000,000,000,000,019,884,624,838,656)."""
    s = text.strip()
    m = _PARAMS.fullmatch(s) if len(s) <= 40 else None  # 40 characters: 10^15 needs 16 digits
    if not m:
        raise InputError(f"--params {text!r} is not a parameter count: give a positive number such as {PARAMS_FORMS}")
    given = Decimal(m[1] + (m[2] or ""))  # exact: Decimal keeps every digit given, whatever the exponent
    shift = _SUFFIX[m[3].lower()]
    # the order of magnitude first, so 1e999999999 builds no number of a billion digits
    if given.is_zero() or not 0 <= given.adjusted() + shift <= 15:
        value = None
    else:
        value = given.scaleb(shift, context=Context(prec=60))  # exact: at most 40 digits were given
    if value is None or not L.PARAMS.low <= value <= L.PARAMS.high:
        raise InputError(f"--params {text!r} is not a parameter count {L.PARAMS.text()} (10^15 is 500x the "
                         f"largest models announced): give a positive number such as {PARAMS_FORMS}")
    if value != value.to_integral_value():
        raise InputError(f"--params {text!r} is not a whole number of parameters: give a count such as {PARAMS_FORMS}")
    return int(value)


# --- KV cache -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class KVCache:
    """Keys and values for ``context`` tokens of ``batch`` sequences, every layer."""

    layers: int
    kv_heads: int
    head_dim: int
    context: int
    batch: int = 1
    dtype: str = "bf16"

    def __post_init__(self):
        for name in ("layers", "kv_heads", "head_dim", "context", "batch"):
            if getattr(self, name) < 1:
                raise InputError(f"the KV cache needs {name} >= 1, got {getattr(self, name)}")
        if self.dtype not in KV_BYTES:
            raise InputError(f"KV-cache dtype {self.dtype!r}: choose one of {', '.join(KV_BYTES)}")

    @property
    def nbytes(self) -> int:
        # 2: one K and one V vector per layer, KV head and token
        return 2 * self.layers * self.kv_heads * self.head_dim * self.context * self.batch * KV_BYTES[self.dtype]


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) from a Hugging Face config; GQA models set num_key_value_heads."""
    config = getattr(config, "text_config", None) or config  # multimodal configs nest the language model
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None)
    hidden = getattr(config, "hidden_size", None)
    if not head_dim and hidden and heads:
        head_dim = hidden // heads
    if not (layers and kv_heads and head_dim):
        raise InputError("the model's config does not give num_hidden_layers, num_attention_heads and a head "
                         "dimension: give --layers, --kv-heads and --head-dim")
    return int(layers), int(kv_heads), int(head_dim)


# --- fitting ------------------------------------------------------------------------------------

def check_reserve(reserve: float) -> float:
    if not (math.isfinite(reserve) and 0 <= reserve < 1):
        raise InputError(f"--reserve is the share of device memory held back, in [0, 1): got {reserve}")
    return reserve


def devices_needed(nbytes: float, memory_gb: float, reserve: float) -> int:
    """How many such devices hold ``nbytes`` with ``reserve`` of each one's memory held back,
    the bytes split evenly (1: it fits on one)."""
    usable = memory_gb * GB * (1 - reserve)
    # the hair of tolerance keeps bytes exactly at the limit (70 GB on 87.5 GB at 20%) at one
    # device despite float rounding in memory * (1 - reserve)
    return max(1, math.ceil(nbytes / usable * (1 - 1e-12)))


@dataclass(frozen=True)
class FormatMemory:
    format: str
    label: str
    bits_per_weight: float
    weight_bytes: float
    kv_bytes: int

    @property
    def total_bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes


def weight_memory(params: int, kv: KVCache | None = None) -> list[FormatMemory]:
    """Every format's weight bytes for ``params`` parameters (and the KV cache bytes, the same for all)."""
    kv_bytes = kv.nbytes if kv else 0
    rows = []
    for name, label in FORMATS:
        bits = bits_per_weight(label)
        rows.append(FormatMemory(name, label, bits, params * bits / 8, kv_bytes))
    return rows


# --- accelerators -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_gb: float  # as the vendor states it (decimal GB); docs/hardware.md
    generation: str  # a key of NATIVE


# Ordered by memory. Sources for every size: docs/hardware.md#memory.
ACCELERATORS = (
    Accelerator("T4", 16, "Turing"),
    Accelerator("L4", 24, "Ada Lovelace"),
    Accelerator("A100 40GB", 40, "Ampere"),
    Accelerator("L40S", 48, "Ada Lovelace"),
    Accelerator("A100 80GB", 80, "Ampere"),
    Accelerator("H100", 80, "Hopper"),
    Accelerator("H200", 141, "Hopper"),
    # the B200 package carries 192 GB of HBM3e (NVIDIA's Blackwell announcement); NVIDIA's DGX B200
    # guide lists 1,440 GB for 8 GPUs, 180 GB each usable there (docs/hardware.md#memory)
    Accelerator("B200", 192, "Blackwell"),
    Accelerator("MI300X", 192, "CDNA 3"),
)
# Unified memory, the largest configuration Apple sells of each chip (--apple).
APPLE = (
    Accelerator("M3 Max", 128, "Apple M-series GPU"),
    Accelerator("M2 Ultra", 192, "Apple M-series GPU"),
)

# Element types the tensor cores / matrix cores multiply in hardware (fp32: the plain FP32
# units every device has). True: the vendor documents it; False: absent from the vendor's list
# of tensor-core precisions; None: not confirmed from a vendor source. docs/hardware.md#native
FEATURES = ("fp32", "fp16", "bf16", "fp8", "int8", "int4", "mxfp4", "nvfp4")
_NO_FP4 = {"mxfp4": False, "nvfp4": False}
NATIVE: dict[str, dict[str, bool | None]] = {
    # Turing whitepaper: tensor cores take FP16, INT8, INT4; BF16 arrived with Ampere
    "Turing": {"fp32": True, "fp16": True, "bf16": False, "fp8": False, "int8": True, "int4": True, **_NO_FP4},
    # A100 whitepaper: TF32, BF16, FP16, INT8, INT4 (and FP64); no FP8
    "Ampere": {"fp32": True, "fp16": True, "bf16": True, "fp8": False, "int8": True, "int4": True, **_NO_FP4},
    # Ada whitepaper / L40 datasheet: fourth-generation tensor cores add FP8 (E4M3, E5M2); INT4 kept
    "Ada Lovelace": {"fp32": True, "fp16": True, "bf16": True, "fp8": True, "int8": True, "int4": True, **_NO_FP4},
    # H100 whitepaper / datasheet: FP8, FP16, BF16, TF32, INT8, FP64; INT4 no longer listed
    "Hopper": {"fp32": True, "fp16": True, "bf16": True, "fp8": True, "int8": True, "int4": False, **_NO_FP4},
    # Blackwell: fifth-generation tensor cores add FP6 and FP4 with hardware block scaling (MXFP4, NVFP4)
    "Blackwell": {"fp32": True, "fp16": True, "bf16": True, "fp8": True, "int8": True, "int4": False,
                  "mxfp4": True, "nvfp4": True},
    # AMD CDNA 3: matrix cores take INT8, FP8, BF16, FP16, TF32, FP32, FP64 (FP8 in the FNUZ encoding)
    "CDNA 3": {"fp32": True, "fp16": True, "bf16": True, "fp8": True, "int8": True, "int4": False, **_NO_FP4},
    # Apple documents no matrix-unit element types for its GPUs in the sources found
    "Apple M-series GPU": {"fp32": True, "fp16": None, "bf16": None, "fp8": None, "int8": None, "int4": None,
                           "mxfp4": None, "nvfp4": None},
}
# Qualified "yes" entries, printed beside the hardware table.
CAVEATS = {
    ("CDNA 3", "fp8"): "MI300X's FP8 is the FNUZ encoding (e4m3fnuz: bias 8, no infinities, max 240), "
                       "not OCP e4m3fn: fp8 weights are re-encoded (and rescaled) to use it",
}

# The hardware element type each format's weights multiply in; None: no hardware path, the
# kernels dequantize to bf16/fp16 in software (nf4, GGUF blocks, int2).
FORMAT_PATH = {
    "fp32": "fp32", "bf16": "bf16", "fp8": "fp8", "int8": "int8", "mxfp4": "mxfp4", "nvfp4": "nvfp4",
    "nf4": None, "nf4+dq": None, "q4_0": None, "q4_k": None, "int2": None,
}


def native(format_name: str, accelerator: Accelerator) -> bool:
    """Whether ``accelerator`` multiplies ``format_name``'s element type in hardware (documented)."""
    feature = FORMAT_PATH[format_name]
    return feature is not None and NATIVE[accelerator.generation][feature] is True
