"""The evaluation protocol: text, windows, paragraphs (README "Evaluation")."""

from pydoc_data.topics import topics

import pytest

from lowbit.eval import protocol
from lowbit.eval.protocol import default_text, paragraphs, read_text, token_windows


class CharTokenizer:
    """One token per character: makes window arithmetic visible."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}


def test_default_text_is_sorted_topics_joined_by_blank_lines():
    text = default_text()
    keys = sorted(topics)
    assert text.startswith(topics[keys[0]]) and text.endswith(topics[keys[-1]])
    assert text == "\n\n".join(topics[k] for k in keys)
    assert read_text(None) == ("pydoc_data.topics", text)


def test_windows_are_consecutive_from_the_start():
    ids, proto = token_windows(CharTokenizer(), "abcdefghij", "t", window=3, windows=2)
    assert ids.tolist() == [[97, 98, 99], [100, 101, 102]]
    assert (proto.window, proto.windows) == (3, 2)


def test_default_windows_clip_to_the_text_and_hash_the_tokens():
    ids, proto = token_windows(CharTokenizer(), "abcdefghij", "t", window=4, windows=None)
    assert ids.shape == (2, 4) and proto.windows == 2
    _, other = token_windows(CharTokenizer(), "abcdefghiX", "t", window=4, windows=None)
    assert other.tokens_sha256 == proto.tokens_sha256  # the dropped tail is not scored
    _, other = token_windows(CharTokenizer(), "Xbcdefghij", "t", window=4, windows=None)
    assert other.tokens_sha256 != proto.tokens_sha256


def test_more_windows_than_the_text_holds_is_an_error_not_a_cap():
    with pytest.raises(ValueError, match="holds 2 windows of 4 tokens.*--windows 2 or fewer"):
        token_windows(CharTokenizer(), "abcdefghij", "t", window=4, windows=3)
    assert token_windows(CharTokenizer(), "abcdefghij", "t", window=4, windows=1)[1].windows == 1


def test_text_shorter_than_one_window_is_an_error():
    with pytest.raises(ValueError, match="fewer than one window of 512"):
        token_windows(CharTokenizer(), "short", "short.txt", window=512)


def test_read_text_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_text(tmp_path / "missing.txt")
    with pytest.raises(IsADirectoryError, match="directory, not a text file"):
        read_text(tmp_path)
    (tmp_path / "blank.txt").write_text(" \n\n")
    with pytest.raises(ValueError, match="empty"):
        read_text(tmp_path / "blank.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_text(bad)


def test_paragraphs():
    text = "short\n\n" + "x" * 41 + "\n\n  " + "y" * 50 + "  \n\n" + "z" * 40
    assert paragraphs(text) == ["x" * 41, "y" * 50]
    assert len(paragraphs(default_text())) == 512


def test_text_larger_than_the_limit_is_refused_without_reading_it_all(tmp_path, monkeypatch):
    monkeypatch.setattr(protocol, "MAX_TEXT_BYTES", 100)
    big = tmp_path / "big.txt"
    big.write_text("x" * 101)
    with pytest.raises(ValueError, match="text file is larger than"):
        protocol.read_text(big)
    big.write_text("a\r\nb\rc" + "x" * 94)  # 100 bytes: read, with universal newlines as before
    assert protocol.read_text(big)[1].startswith("a\nb\nc")


def test_a_missing_text_still_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="text file does not exist"):
        protocol.read_text(tmp_path / "nope.txt")
