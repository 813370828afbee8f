"""What the models tests share: a refusal that must come from a file's header alone, a file's sha256 by hashlib."""

import hashlib
import resource
import time
from pathlib import Path

import pytest

from lowbit.errors import ModelLoadError


def refused_cheaply(call, *needles) -> str:
    """``call()`` raises a one-line ModelLoadError holding each needle, in well under a second,
    with the process's peak memory grown by less than 64 MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        call()
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 64 << 10
    message = str(err.value)
    assert "\n" not in message and all(n in message for n in needles), message
    return message


def sha256_of(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
