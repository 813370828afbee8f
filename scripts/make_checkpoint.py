"""Write a synthetic Llama-architecture checkpoint (``lowbit.models.synthetic``): sharded safetensors, index,
config.json and the embedded SmolLM2's tokenizer, shard by shard (memory: one shard).

    .venv/bin/python scripts/make_checkpoint.py OUT --shape 8b                  # Llama-3-8B's shapes, 16 GB
    .venv/bin/python scripts/make_checkpoint.py OUT --shape tiny --layers 4 --init tile --shard-size 5MB

One line per shard on stderr; exit 2 with a one-line message on bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from lowbit.errors import LowbitError
from lowbit.models.synthetic import DEFAULT_SHARD_SIZE, DTYPES, INITS, PRESETS, parse_size, write_checkpoint

# option -> Shape field it overrides
_SIZES = {"hidden": "hidden", "layers": "layers", "mlp": "mlp", "heads": "heads", "kv_heads": "kv_heads",
          "vocab": "vocab"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make_checkpoint.py", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="new (or empty) directory to write")
    parser.add_argument("--shape", choices=PRESETS, default="tiny", help="preset shapes (default: tiny)")
    for option in _SIZES:
        parser.add_argument(f"--{option.replace('_', '-')}", type=int, help=f"override the preset's {option}")
    parser.add_argument("--init", choices=INITS, default="random",
                        help="random: normal(0, 0.02); tile: the embedded SmolLM2's weights repeated to the shapes")
    parser.add_argument("--shard-size", default=str(DEFAULT_SHARD_SIZE // 10**9) + "GB",
                        help="largest shard, bytes or with KB/MB/GB/TB (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random init's seed (default: 0)")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16", help="default: bf16")
    args = parser.parse_args(argv)
    overrides = {field: getattr(args, option) for option, field in _SIZES.items() if getattr(args, option) is not None}
    shape = dataclasses.replace(PRESETS[args.shape], **overrides)
    start = time.perf_counter()
    try:
        out = write_checkpoint(args.out, shape, init=args.init, seed=args.seed, dtype=DTYPES[args.dtype],
                               shard_size=parse_size(args.shard_size), progress=_say)
    except (LowbitError, OSError) as e:
        print(f"make_checkpoint.py: error: {e}", file=sys.stderr)
        return 2
    _say(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
