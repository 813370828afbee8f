"""The root of everything lowbit caches (references, converted models):
``$LOWBIT_CACHE``, else ``$XDG_CACHE_HOME/lowbit``, else ``~/.cache/lowbit``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    if os.environ.get("LOWBIT_CACHE"):
        return Path(os.environ["LOWBIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lowbit"
