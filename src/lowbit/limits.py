"""The range of every number a user gives lowbit, in one place (docs/limits.md gives each range and why).

A ``Range`` serves both entry points: ``Range.arg(flag)`` is an argparse ``type=``, so a value outside the range
stops a command while its arguments are read, before any model loads, in one line (exit 2); ``Range.check`` is the
same test for the library's entry points, raising ``InputError``. ``Range.text`` is what ``--help`` shows.
Numbers are read from their text with a bounded length before ``int``/``float`` see them, so no input makes the
reading itself slow (Python's ``int`` of a 100,000-digit string is quadratic; ``float`` takes ``nan``, ``inf``,
``1_000``).

Light on purpose: only the standard library, so ``lowbit bits`` and ``--help`` load no torch.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass

from .errors import InputError

# a count is at most this many characters: 2**64 has 20 digits, and every range below ends far before
_MAX_NUMBER_CHARS = 40
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


@dataclass(frozen=True)
class Range:
    """``low <= x <= high`` (``low < x`` where ``low_open``), of ``int`` or ``float``; ``also``: values allowed
    besides (temperature 0: greedy). ``why`` is docs/limits.md's reason, shortened for error lines."""

    what: str
    low: float
    high: float
    kind: type = int
    low_open: bool = False
    high_open: bool = False
    also: tuple = ()
    why: str = ""

    def text(self) -> str:
        """``"from 1 to 100,000"``, ``"in (0, 1]"``, ``"0 or in [1e-06, 100]"``, as --help and errors say it."""
        if self.kind is int:
            body = f"from {self.low:,} to {self.high:,}"
        else:
            body = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        return " or ".join([*(f"{a:g}" for a in self.also), body])

    def contains(self, x) -> bool:
        if x in self.also:
            return True
        above = x > self.low if self.low_open else x >= self.low
        below = x < self.high if self.high_open else x <= self.high
        return above and below

    def message(self, flag: str, given) -> str:
        kind = "a whole number" if self.kind is int else "a number"  # the flag names what it counts
        why = f" ({self.why})" if self.why else ""
        shown = repr(given) if len(repr(given)) <= 60 else f"{repr(given)[:40]}... ({len(str(given)):,} characters)"
        return f"{flag} must be {kind} {self.text()}{why}, got {shown}"

    def parse(self, text: str, flag: str):
        """``text`` read as this range's kind and checked; ``InputError`` naming ``flag`` otherwise."""
        s = str(text).strip()
        pattern = _INT if self.kind is int else _FLOAT
        if len(s) > _MAX_NUMBER_CHARS or not pattern.fullmatch(s):
            raise InputError(self.message(flag, text))
        x = int(s) if self.kind is int else float(s)
        if not (math.isfinite(x) and self.contains(x)):  # float("1e999") is inf
            raise InputError(self.message(flag, text))
        return x

    def check(self, x, flag: str):
        """``x`` (already a number) checked against the range: the library's entry points."""
        if isinstance(x, bool) or not isinstance(x, (int, float)) or (self.kind is int and not isinstance(x, int)):
            raise InputError(self.message(flag, x))
        if not (math.isfinite(x) and self.contains(x)):
            raise InputError(self.message(flag, x))
        return x

    def arg(self, flag: str):
        """An argparse ``type=``: the number, or argparse's one-line usage error naming the range."""
        def convert(text: str):
            try:
                return self.parse(text, flag)
            except InputError as e:
                # argparse prefixes "argument FLAG: "; the message says the flag already, so keep the rest
                raise argparse.ArgumentTypeError(str(e).removeprefix(f"{flag} ")) from None
        convert.__name__ = self.what  # argparse names the type in a few of its own messages
        return convert


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, as torch's default thread count; cpu_count elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


# --- the ranges (docs/limits.md has the table and the reasons) ------------------------------------------------

# The longest context of the open models lowbit loads: Llama 3.1's 131,072 tokens (its config.json,
# max_position_embeddings). A window or a generation longer than the model's own context is refused later, by the
# model; this bound holds before any model is read.
LONGEST_CONTEXT = 131_072
WINDOW = Range("tokens per window", 2, LONGEST_CONTEXT, why="2: a window scores its W-1 next-token predictions")
TRAIN_WINDOW = Range("tokens per training step", 2, LONGEST_CONTEXT)
MAX_NEW_TOKENS = Range("tokens to generate", 1, LONGEST_CONTEXT)
# Windows of text: each is a forward pass (~1 s for SmolLM2 on 2 CPU threads), so 100,000 is more than a day of
# compute; the text must hold them as well (checked once it is tokenized).
WINDOWS = Range("windows", 1, 100_000)
QAT_SKIPPED_WINDOWS = Range("scored windows training skips", 0, 100_000)  # qat --windows: 0 trains from token 0
CALIBRATE = Range("calibration windows", 1, 100_000)
STEPS = Range("training steps", 1, 1_000_000)
# A block past a row's length is one scale per row; 2**20 is 16x the longest rows of released LLMs (Llama 3.1
# 405B's MLP: 53,248 inputs) and keeps blocks x rows well inside int64 (2**70 overflowed torch's view()).
BLOCK_SIZE = Range("weights per block", 1, 2**20)


def check_block_size(block: int) -> None:
    """A block size given in code (labels are read by QuantConfig.parse): a positive int within BLOCK_SIZE."""
    if not isinstance(block, int) or isinstance(block, bool) or block <= 0:
        raise InputError(f"block_size must be a positive integer, got {block!r}")
    BLOCK_SIZE.check(block, "block_size")  # past it blocks x rows overflowed int64 in torch (docs/limits.md)


# Bits per weight: fp32, the widest stored format, is 32 bits; a budget above it leaves every layer at its largest
# candidate anyway.
BUDGET = Range("bits per weight", 0, 32, kind=float, low_open=True,
               why="a positive number of bits per weight; fp32 stores 32")
# Sampling. top-k past the vocabulary keeps every token; 2**20 is 4x the largest vocabularies (Gemma 3: 262,144).
TOP_K = Range("tokens kept", 1, 2**20)
TOP_P = Range("probability mass kept", 0, 1, kind=float, low_open=True)
# 0 is greedy. Logits are divided by T in float32: below 1e-6 the largest logits overflow to inf and softmax gives
# NaN (--temperature 1e-40 did); above 100 any model's logits (spread < 100) give a flat distribution.
TEMPERATURE = Range("temperature", 1e-6, 100, kind=float, also=(0,), why="0: greedy")
# torch.Generator.manual_seed takes an unsigned 64-bit seed (2**64 raised "Overflow when unpacking long long").
SEED = Range("seed", 0, 2**64 - 1)
# OpenMP threads beyond the cores only contend for them (torch's default is the usable cores). 4x leaves room to try
# oversubscription; --threads 10000 took 88 s for 2 tokens and 100,000 crashed mapping thread stacks.
THREADS_PER_CPU = 4
THREADS = Range("threads", 1, THREADS_PER_CPU * usable_cpus(), why=f"{THREADS_PER_CPU} x the usable CPUs")
# Adam's step for QAT (--lr, --scale-lr): positive; 1 is far above any step that trains (LSQ, arXiv 1902.08153 §3,
# uses 0.01 and less) and keeps a typo such as 1e5 from diverging at once.
LEARNING_RATE = Range("learning rate", 0, 1, kind=float, low_open=True)
# Parameter counts for `lowbit memory`: 10**15 is 500x the largest dense models announced (~2T parameters).
MAX_PARAMS = 10**15
PARAMS = Range("parameters", 1, MAX_PARAMS)
# KV cache shape for `lowbit memory`: plain integer arithmetic, bounded so the printed bytes stay readable.
CONTEXT = Range("tokens per sequence", 1, 2**24, why="16.8M: above the longest advertised contexts (10M)")
BATCH = Range("sequences", 1, 2**20)
LAYERS = Range("decoder layers", 1, 2**16)
KV_HEADS = Range("KV heads", 1, 2**16)
HEAD_DIM = Range("dimensions per head", 1, 2**16)
# --text: the whole file is read and tokenized; 1 GiB is twice WikiText-103's training split (516 MB).
MAX_TEXT_BYTES = 2**30
# `lowbit bits`: the value's text (every float64 has an exact decimal of at most 767 significant digits), and the
# decimal exponents between which it is rounded in exact rationals; past them it is beyond every format's range for
# every --scale (fp32's range is 1.4e-45 to 3.4e38 and a scale is a float32), so it rounds as overflow or underflow.
MAX_VALUE_CHARS = 1000
EXACT_EXPONENT = 1000



class OneLineParser(argparse.ArgumentParser):
    """argparse's parser with its errors in one line, as every other lowbit error: ``lowbit CMD: error: ...``
    and exit 2, the usage left to ``--help`` (argparse prints the whole usage first, a dozen lines for some
    commands). Subparsers take the root parser's class, so this one class covers every command."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")
