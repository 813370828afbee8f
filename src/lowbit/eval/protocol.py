"""The evaluation protocol: which text, how it is cut into token windows (README "Evaluation").

Text: the values of ``pydoc_data.topics.topics`` (shipped with CPython, so present
everywhere) in sorted key order, joined with a blank line, or a user's file. It is
tokenized once, without special tokens; windows are consecutive, non-overlapping and
start at token 0; within a window of W tokens the W-1 next-token predictions are scored.
"""

from __future__ import annotations

import hashlib
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..limits import MAX_TEXT_BYTES
from ..models.loader import CAUSAL_LM

DEFAULT_TEXT = "pydoc_data.topics"
DEFAULT_WINDOW = 512
DEFAULT_WINDOWS = 16


@dataclass(frozen=True)
class Protocol:
    """What was scored. ``windows`` is the number actually used (the text may hold fewer)."""

    text: str
    text_sha256: str
    window: int
    windows: int
    tokens_sha256: str

    def to_dict(self) -> dict:
        return asdict(self)


def default_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def read_text(path: str | Path | None) -> tuple[str, str]:
    """``(name, text)``: the default text for None, else the UTF-8 file at ``path``: a regular file of at most
    MAX_TEXT_BYTES (docs/limits.md). A device, a FIFO or a socket is refused by what it is, before anything is read
    from it: /dev/zero and /dev/urandom never end, and a FIFO blocks until a writer comes."""
    if path is None:
        return DEFAULT_TEXT, default_text()
    p = Path(path)
    try:
        mode = p.stat().st_mode  # follows symlinks: a link to a regular file is one
    except FileNotFoundError:
        raise FileNotFoundError(f"text file does not exist: {p}") from None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"--text names a directory, not a text file: {p}")
    if not stat.S_ISREG(mode):
        raise InputError(f"--text names {_kind(mode)}, not a regular file: {p} (lowbit reads a text file whole, "
                         "and a device or pipe may never end)")
    with p.open("rb") as f:
        data = f.read(MAX_TEXT_BYTES + 1)  # bounded even if the file grows while it is read
    if len(data) > MAX_TEXT_BYTES:
        raise InputError(f"text file is larger than {MAX_TEXT_BYTES >> 30} GiB: {p} (the whole text is tokenized; "
                         "give the part to score)")
    try:
        body = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"text file is not UTF-8: {p} ({e.reason} at byte {e.start})") from e
    if not body.strip():
        raise InputError(f"text file is empty: {p}")
    return str(p), body.replace("\r\n", "\n").replace("\r", "\n")


def _kind(mode: int) -> str:
    """What a non-regular, non-directory file is, as a sentence names it."""
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def token_windows(
    tokenizer, text: str, name: str, *, window: int = DEFAULT_WINDOW, windows: int | None = DEFAULT_WINDOWS
) -> tuple[torch.Tensor, Protocol]:
    """``(ids, protocol)``: ids is ``(n, window)`` int64, the text's first ``n`` windows.

    ``windows=None`` means ``DEFAULT_WINDOWS`` or as many as the text holds, if fewer; an
    explicit count the text cannot fill is an error, never a silent cap.
    """
    if window < 2 or (windows is not None and windows < 1):
        raise InputError(f"need window >= 2 and windows >= 1, got window={window}, windows={windows}")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    held = ids.numel() // window
    if held == 0:
        raise InputError(f"text {name} holds {ids.numel()} tokens, fewer than one window of {window}")
    if windows is not None and windows > held:
        raise InputError(f"text {name} holds {held} windows of {window} tokens ({ids.numel()} tokens); "
                         f"asked for {windows}: use --windows {held} or fewer")
    n = min(DEFAULT_WINDOWS if windows is None else windows, held)
    ids = ids[: n * window].view(n, window)
    protocol = Protocol(
        text=name,
        text_sha256=hashlib.sha256(text.encode()).hexdigest(),
        window=window,
        windows=n,
        tokens_sha256=hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
    )
    return ids, protocol


def paragraphs(text: str, *, min_chars: int = 40, limit: int = 512) -> list[str]:
    """The encoder protocol's sentences: blocks between blank lines longer than ``min_chars``."""
    blocks = (b.strip() for b in text.replace("\r\n", "\n").split("\n\n"))
    return [b for b in blocks if len(b) > min_chars][:limit]


def scored_count(kind: str, text: str | None, windows: int) -> int:
    """What `lowbit compare` scores, so calibration starts after it: ``windows`` windows of a causal
    LM's text (``kind`` ``ModelInfo.kind``), or the encoder protocol's paragraphs."""
    return windows if kind == CAUSAL_LM else len(paragraphs(read_text(text)[1]))
