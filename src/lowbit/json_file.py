"""Reading a JSON file a user hands over (a plan, a sensitivity table): every problem is one ValueError."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .errors import InputError

T = TypeVar("T")


def load_json(path, what: str, parse: Callable[[object], T]) -> T:
    """``parse(the JSON at path)``; unreadable, not JSON, or refused by ``parse`` (a ValueError) is a ValueError
    naming ``what`` and the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{what} {path} is not valid JSON: {e}") from None
    try:
        return parse(data)
    except ValueError as e:
        raise InputError(f"{what} {path}: {e}") from None
