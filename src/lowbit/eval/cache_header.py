"""What a reference cache file's safetensors header says, read without torch (``lowbit cache list``
reads every header and must start in well under a second: issue 25, deliverable 5)."""

from __future__ import annotations

import json
import os

from ..errors import LowbitError

DESCRIPTION_KEY, CHECKSUM_KEY = "lowbit-cache", "lowbit-sha256"
MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


class CacheIntegrityError(LowbitError, ValueError):
    """A cache file does not hold what its header and checksums say (truncated, altered, foreign)."""


def read_header(fd: int) -> tuple[dict, dict, int]:
    """``(tensors, metadata, data_start)`` from a safetensors file's header, reading nothing else."""
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise CacheIntegrityError("it is shorter than a safetensors header")
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER:
        raise CacheIntegrityError("its header length is implausible")
    raw = os.pread(fd, n, 8)
    try:
        header = json.loads(raw)
        metadata = header.pop("__metadata__", None) or {}
    except (ValueError, AttributeError) as e:
        raise CacheIntegrityError("its header is not safetensors JSON") from e
    return header, metadata, 8 + n
