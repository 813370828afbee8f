"""lowbit's cache directory and the space probes its writers ask before they start."""

from lowbit import cachedir


def test_free_memory_probe():
    available = cachedir.free_memory()
    assert available is None or available > 0
