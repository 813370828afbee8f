"""`lowbit cache [list]` / `lowbit cache clear [--older-than D]`: what the cache holds, and freeing it.

The listing reads each reference's safetensors header and each converted model's
``lowbit-cache.json``, never the data, so it takes milliseconds however big the cache is.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from rich.table import Table

from ..cachedir import cache_root, is_entry, is_temp, last_change, remove_file, remove_tree, sweep_temps, tree_size
from ..errors import InputError
from ..eval.cache_header import DESCRIPTION_KEY, read_header  # not eval.cache: that imports torch
from ..models.converted import META as MODEL_DESCRIPTION
from ..models.hashing import RECORDS
from .common import console

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def add_parser(sub) -> None:
    p = sub.add_parser("cache")
    actions = p.add_subparsers(dest="action", metavar="{list,clear}")
    actions.add_parser("list", help="list what is cached, with sizes and ages (the default)")
    clear = actions.add_parser("clear", help="remove cached entries and the temp files of killed runs")
    clear.add_argument("--older-than", metavar="D",
                       help="only entries not used for D, e.g. 30m, 12h, 7d, 2w (default: all)")
    p.set_defaults(run=run, action="list", older_than=None)


def run(args) -> int:
    root = cache_root()
    con = console()
    if args.action == "clear":
        older_than = None if args.older_than is None else parse_duration(args.older_than)
        con.print(clear(root, older_than), soft_wrap=True, highlight=False)
        return 0
    found = entries(root)
    if not found:
        con.print(f"the cache {root} is empty", soft_wrap=True, highlight=False)
        return 0
    con.print(cache_table(root, found))
    return 0


@dataclass(frozen=True)
class Entry:
    """One thing in the cache. ``kind``: a reference's kind, "model" or "temp"; times in epoch seconds."""

    path: Path
    kind: str
    model: str = ""
    text: str = ""
    shape: str = ""  # "512 × 16" (window × windows) or "240 paragraphs"
    size: int = 0
    created: float = 0.0
    used: float = 0.0  # last use: lowbit touches a reference's mtime each time it reads it


def entries(root: Path) -> list[Entry]:
    """References, converted models and temp files lowbit wrote (nothing else), in name order."""
    if not root.is_dir():
        return []
    found = []
    for p in sorted(root.iterdir()):
        if is_temp(p.name):
            found.append(Entry(p, "temp", size=tree_size(p), created=last_change(p), used=last_change(p)))
        elif is_entry(p.name) and p.is_file():
            found.append(_reference_entry(p))
        elif is_entry(p.name) and p.is_dir():
            found.append(_model_entry(p))
    return found


def _reference_entry(p: Path) -> Entry:
    kind = p.stem.rpartition("-")[0] or "file"
    stat = p.stat()
    try:
        fd = os.open(p, os.O_RDONLY)
        try:
            metadata = read_header(fd)[1]
        finally:
            os.close(fd)
        # files from before descriptions were stored hold the protocol's fields flat
        d = json.loads(metadata[DESCRIPTION_KEY]) if DESCRIPTION_KEY in metadata else dict(metadata)
        protocol = d.get("protocol") or d
    except (OSError, ValueError, TypeError, AttributeError):
        return Entry(p, f"{kind} (unreadable)", size=stat.st_size, created=stat.st_mtime, used=stat.st_mtime)
    if "window" in protocol:
        shape = f"{protocol['window']} × {protocol.get('windows', '?')}"
    else:
        shape = f"{d['paragraphs']} paragraphs" if "paragraphs" in d else ""
    model = d.get("model") or d.get("source") or str(d.get("model_sha256", ""))[:12]
    return Entry(p, str(d.get("kind", kind)), str(model), str(protocol.get("text", "")), shape, stat.st_size,
                 _epoch(d.get("created")) or stat.st_mtime, stat.st_mtime)


def _model_entry(p: Path) -> Entry:
    described = p / MODEL_DESCRIPTION
    try:
        d = json.loads(described.read_text(encoding="utf-8"))
        used = described.stat().st_mtime
    except (OSError, ValueError):
        d, used = None, last_change(p)
    if not isinstance(d, dict):
        return Entry(p, "model (unreadable)", size=tree_size(p), created=used, used=used)
    return Entry(p, str(d.get("kind", "model")), str(d.get("model") or d.get("source") or ""), size=tree_size(p),
                 created=_epoch(d.get("created")) or used, used=used)


def _epoch(iso) -> float | None:
    try:
        return datetime.fromisoformat(str(iso).replace("Z", "+00:00")).timestamp()
    except (TypeError, ValueError):
        return None


def clear(root: Path, older_than: float | None = None) -> str:
    """Remove every entry not used for ``older_than`` seconds (all if None), and what killed runs
    left; returns what was freed, as one line. A reference another process is reading is kept."""
    now = time.time()
    removed, freed, busy = 0, 0, 0
    for entry in entries(root):
        if entry.kind == "temp" or (older_than is not None and now - entry.used < older_than):
            continue
        if entry.path.is_dir():
            remove_tree(entry.path)
        elif not remove_file(entry.path):
            busy += 1
            continue
        removed, freed = removed + 1, freed + entry.size
    temps = sweep_temps(root)
    records = root / RECORDS  # the model files' recorded sha256 (lowbit.models.hashing): read again on next use
    hashes = len(list(records.iterdir())) if older_than is None and records.is_dir() else 0
    if older_than is None and records.is_dir():
        remove_tree(records)
    line = f"removed {removed} {_plural(removed, 'entry', 'entries')} ({human_size(freed)}) from {root}"
    if hashes:
        line += f"; {hashes} recorded file {_plural(hashes, 'hash', 'hashes')}"
    if temps:
        line += f"; {len(temps)} temp {_plural(len(temps), 'file')} of killed runs " \
                f"({human_size(sum(size for _, size in temps))})"
    if busy:
        line += f"; kept {busy} in use by a running lowbit"
    return line


def cache_table(root: Path, found: list[Entry]) -> Table:
    table = Table(title=f"lowbit cache: {root}")
    for col, justify in [("entry", "left"), ("kind", "left"), ("model", "left"), ("text", "left"),
                         ("window × windows", "right"), ("size", "right"), ("age", "right"),
                         ("last used", "right")]:
        table.add_column(col, justify=justify)
    now = time.time()
    for e in found:
        table.add_row(_short(e.path.name), e.kind, e.model, e.text, e.shape, human_size(e.size),
                      human_age(now - e.created), human_age(now - e.used))
    table.caption = f"{len(found)} {_plural(len(found), 'entry', 'entries')}, {human_size(sum(e.size for e in found))}"
    return table


def parse_duration(text: str) -> float:
    """``"30m"``, ``"12h"``, ``"7d"``, ``"2w"``, ``"90s"`` -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text.lower())
    if match is None:
        raise InputError(f"--older-than takes a number and a unit (s, m, h, d or w), e.g. 7d; got {text!r}")
    return float(match[1]) * _UNITS[match[2]]


def human_size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def human_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit in ("d", "h", "m"):
        if seconds >= _UNITS[unit]:
            return f"{int(seconds // _UNITS[unit])}{unit}"
    return f"{int(seconds)}s"


def _short(name: str) -> str:
    """``ref-causal-<32 hex>.safetensors`` -> ``ref-causal-3f2a9c1b…``: the key's first 8 digits identify it."""
    match = re.fullmatch(r"(.*-)([0-9a-f]{16,})(\.safetensors)?", name)
    return f"{match[1]}{match[2][:8]}…" if match else name


def _plural(n: int, one: str, many: str | None = None) -> str:
    return one if n == 1 else (many or one + "s")
