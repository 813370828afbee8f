"""How lowbit's memory and time grow with the model: peak RSS and wall time of each job on the embedded
SmolLM2-135M and synthetic Llama-architecture checkpoints of 1B, 3B and 8B parameters.

    .venv/bin/python benchmarks/bench_scaling.py [--shapes 135m,1b,3b,8b] [--jobs rtn,amse,gptq,compare]
        [--checkpoints DIR] [--json FILE]

Each job is its own process under ``/usr/bin/time -v``, so each peak is that job's alone (the kernel's
``Maximum resident set size``). The synthetic checkpoints are written by ``scripts/make_checkpoint.py``
(random bf16 weights: time, memory and bytes mean something, quality does not) into a temporary directory
deleted afterwards, or kept in ``--checkpoints DIR`` to be reused by a later run. An 8B checkpoint is 16 GB
and its ``gptq`` job takes hours on 2 cores: see README "Models larger than memory" for the figures.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SHAPES = ("135m", "1b", "3b", "8b")  # 135m: the embedded SmolLM2; the rest: make_checkpoint.py's presets
CALIBRATE = 4  # calibration windows of 512 tokens (the issue's --calibrate 4)
JOBS = {
    "rtn": ["quantize", "--format", "nf4"],
    "amse": ["quantize", "--format", "nf4@amse", "--calibrate", str(CALIBRATE)],
    "gptq": ["quantize", "--format", "nf4/32+dq+had+gptq@amse", "--calibrate", str(CALIBRATE)],
    "compare": ["compare", "--formats", "nf4,q4_0", "--windows", "2"],
}


def timed(argv: list[str], log: Path) -> dict:
    """Run ``argv`` under /usr/bin/time -v: ``{"seconds", "peak_gb", "rc"}``; its output goes to ``log``."""
    with log.open("w") as out:
        rc = subprocess.run(["/usr/bin/time", "-v", *argv], stdout=out, stderr=subprocess.STDOUT).returncode
    text = log.read_text()
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    seconds = sum(float(p) * 60**i for i, p in enumerate(reversed(wall.group(1).split(":")))) if wall else None
    return {"seconds": seconds, "peak_gb": int(peak.group(1)) * 1024 / 1e9 if peak else None, "rc": rc}


def checkpoint(shape: str, where: Path, console: Console) -> str | None:
    """The ``--model`` of ``shape``: None for the embedded model, else a checkpoint written once into ``where``."""
    if shape == "135m":
        return None
    path = where / f"synthetic-{shape}"
    if not (path / "config.json").exists():
        console.print(f"writing the synthetic {shape} checkpoint to {path}")
        subprocess.run([PYTHON, str(ROOT / "scripts" / "make_checkpoint.py"), "--shape", shape, str(path)],
                       check=True)
    return str(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"from {', '.join(SHAPES)}")
    p.add_argument("--jobs", default=",".join(JOBS), help=f"from {', '.join(JOBS)}")
    p.add_argument("--checkpoints", type=Path, help="keep (and reuse) the synthetic checkpoints here")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    shapes, jobs = args.shapes.split(","), args.jobs.split(",")
    unknown = [s for s in shapes if s not in SHAPES] + [j for j in jobs if j not in JOBS]
    if unknown:
        p.error(f"unknown shape or job: {', '.join(unknown)}")
    console, rows = Console(), []
    with tempfile.TemporaryDirectory(prefix="lowbit-scaling-") as tmp:
        where = args.checkpoints or Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        for shape in shapes:
            model = checkpoint(shape, where, console)
            for job in jobs:
                out = Path(tmp) / f"out-{shape}-{job}"
                argv = [PYTHON, "-m", "lowbit.cli", *JOBS[job], *(["--model", model] if model else [])]
                argv += ["-o", str(out)] if JOBS[job][0] == "quantize" else []
                command = " ".join(["lowbit", *argv[3:]])
                console.print(f"{shape} {job}: {command}")
                start = time.time()
                row = {"shape": shape, "job": job, "command": command, **timed(argv, Path(tmp) / f"{shape}-{job}.log")}
                if row["rc"]:
                    console.print((Path(tmp) / f"{shape}-{job}.log").read_text()[-2000:])
                console.print(f"  {row['seconds'] or time.time() - start:.0f} s, peak {row['peak_gb']:.2f} GB, "
                              f"exit {row['rc']}")
                rows.append(row)
                shutil.rmtree(out, ignore_errors=True)
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=1))
            if model and args.checkpoints is None:
                shutil.rmtree(model)
    table = Table("model", *jobs, title="peak RSS (GB) / wall time (s), each job its own process")
    for shape in shapes:
        cells = {r["job"]: f"{r['peak_gb']:.2f} / {r['seconds']:.0f}" + ("" if r["rc"] == 0 else f" (exit {r['rc']})")
                 for r in rows if r["shape"] == shape}
        table.add_row(shape, *(cells.get(j, "") for j in jobs))
    console.print(table)
    return 1 if any(r["rc"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
