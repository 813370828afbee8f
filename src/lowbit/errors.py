"""Exceptions lowbit raises on purpose (callers catch these; anything else is a bug)."""

from __future__ import annotations


class LowbitError(Exception):
    """Base of every error lowbit raises deliberately."""


class InputError(LowbitError, ValueError):
    """Input lowbit cannot use: an argument, a value or a file's content (message: one line saying
    what and why). A ValueError too, so callers that catch ValueError keep working."""


class ModelLoadError(LowbitError, ValueError):
    """A model could not be found, read or parsed (message: one line naming the problem)."""


class LayerQuantizeError(LowbitError, ValueError):
    """A layer's weight cannot be stored in the requested format (the message names the layer)."""


class UnrepresentableError(LowbitError, ValueError):
    """Finite input a format cannot hold: a stored scale or a dequantized value would overflow
    (the message names the first such block and the format's largest magnitude)."""


class LowbitWarning(UserWarning):
    """A legal but probably unintended choice (e.g. a block size that stores more bits than the input)."""
