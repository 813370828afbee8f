"""The golden table: what lowbit writes and measures for a fixed list of runs, to hold refactors to the bit.

For each run: the sha256 and size of the saved ``model.safetensors`` (``lowbit quantize`` / ``lowbit qat``),
the mean KL of ``lowbit eval`` on that directory, and, where ``lowbit compare`` can run the same label or plan,
compare's mean KL. Every command goes through the CLI, so the table does not depend on any library API.
The protocol is small so the whole table takes minutes on 2 cores: 2 scored windows of 128 tokens, 4
calibration windows after them (``tests/golden/``).

    .venv/bin/python scripts/golden.py --write tests/golden/outputs.json   # record (before a refactor)
    .venv/bin/python scripts/golden.py --check tests/golden/outputs.json   # compare, exit 1 on any change

``tests/test_golden_outputs.py`` (``pytest -m slow``) runs the check.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOLDEN = HERE.parent / "tests" / "golden"
PROTOCOL = ["--window", "128", "--windows", "2"]
CALIBRATE = ["--calibrate", "4"]
LABELS = ("nf4", "nf4+dq", "q4_0", "nf4@amse", "int4_asym/64@hqq", "nf4/32+dq+had+gptq@amse",
          "nf4/32+dq+awq+gptq@amse", "lloyd4/32+dq+gptq+cb@amse", "int8_outlier")


def runs() -> dict[str, dict]:
    """name -> {"quantize": argv after ``lowbit``, without -o; "compare": compare's selecting args or None}."""
    table = {label: {"quantize": ["quantize", "--format", label, *PROTOCOL, *calibrate(label)],
                     "compare": ["--formats", label]} for label in LABELS}
    plan = str(GOLDEN / "plan.json")
    # the plan's rules are +gptq and @amse: it calibrates; the budget's candidates (int3..int8) do not
    table["plan"] = {"quantize": ["quantize", "--plan", plan, *PROTOCOL, *CALIBRATE], "compare": ["--plan", plan]}
    table["budget 4.5"] = {"quantize": ["quantize", "--budget", "4.5", "--sensitivity",
                                        str(GOLDEN / "sensitivity.json"), *PROTOCOL], "compare": None}
    table["qat nf4 2 steps"] = {"quantize": ["qat", "--format", "nf4", "--steps", "2", "--init", "mse",
                                             "--train-window", "64", *PROTOCOL], "compare": None}
    return table


def calibrate(label: str) -> list[str]:
    """``--calibrate`` where the label calibrates (the CLI refuses it elsewhere)."""
    return CALIBRATE if any(s in label for s in ("@amse", "@ahqq", "+gptq", "+awq")) else []


def lowbit(*argv: str, cwd: Path) -> None:
    exe = Path(sys.executable).with_name("lowbit")
    done = subprocess.run([str(exe), *argv], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "LOWBIT_DEBUG": "1"})
    if done.returncode:
        raise SystemExit(f"lowbit {' '.join(argv)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def kl_mean(path: Path) -> float:
    (row,) = [r for r in json.loads(path.read_text())["results"] if "kl_mean" in r]
    return row["kl_mean"]


def measure(names: list[str] | None = None, log=print) -> dict[str, dict]:
    table = runs()
    out = {}
    with tempfile.TemporaryDirectory(prefix="lowbit-golden-") as tmp:
        work = Path(tmp)
        for i, name in enumerate(names or table):
            run = table[name]
            model = work / f"m{i}"
            lowbit(*run["quantize"], "-o", str(model), cwd=work)
            lowbit("eval", str(model), *PROTOCOL, "--json", str(work / f"e{i}.json"), cwd=work)
            row = {"sha256": sha256(model / "model.safetensors"), "bytes": (model / "model.safetensors").stat().st_size,
                   "kl_eval": kl_mean(work / f"e{i}.json")}
            if run["compare"] is not None:
                given = [a for a in CALIBRATE if a in run["quantize"]] and CALIBRATE
                lowbit("compare", *run["compare"], *PROTOCOL, *given, "--json", str(work / f"c{i}.json"), cwd=work)
                row["kl_compare"] = kl_mean(work / f"c{i}.json")
            out[name] = row
            log(f"{name}: {json.dumps(row)}")
            for f in model.iterdir():
                f.unlink()
            model.rmdir()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--write", metavar="FILE")
    what.add_argument("--check", metavar="FILE")
    p.add_argument("--only", metavar="NAME", action="append", help="one run of the table (repeatable)")
    args = p.parse_args()
    measured = measure(args.only)
    if args.write:
        Path(args.write).write_text(json.dumps(measured, indent=1) + "\n")
        return 0
    expected = json.loads(Path(args.check).read_text())
    changed = [name for name, row in measured.items() if expected.get(name) != row]
    for name in changed:
        print(f"changed: {name}: {expected.get(name)} -> {measured[name]}")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
