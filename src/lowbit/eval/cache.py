"""Where cached reference results live: ``$LOWBIT_CACHE``, else ``$XDG_CACHE_HOME/lowbit``, else ``~/.cache/lowbit``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..cachedir import cache_dir

# Bump when what a cache file holds, or how it is computed, changes: old files are then ignored.
CACHE_VERSION = 1


def cache_path(kind: str, **key) -> Path:
    """A file name from the sha256 of everything that determines its contents."""
    blob = json.dumps({"kind": kind, "version": CACHE_VERSION, **key}, sort_keys=True)
    return cache_dir() / f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:32]}.safetensors"
