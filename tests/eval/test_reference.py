"""The original model's predictions, computed once and cached: what the file holds, when it is computed again
(never while it is whole), and the space it needs, checked before the model runs."""

import errno
import os

import pytest
import torch

from lowbit import cachedir
from lowbit.eval.cache import CacheFile, CacheSpaceError
from lowbit.eval.causal import score_causal
from lowbit.eval.reference import causal_reference

from .helpers import VOCAB, WINDOW, WINDOWS, Loads, never, reference


def test_reference_round_trip_with_description(lm, root):
    first = reference(lm, model_name="tiny", model_source="/models/tiny")
    again = reference(lm, never)
    assert torch.equal(again.lse, first.lse) and torch.equal(again.ids, lm[1])
    assert score_causal(lm[0], again, progress=False)["kl_mean"] < 1e-5
    d = CacheFile(first.path).description
    assert (d["kind"], d["model"], d["source"], d["model_sha256"], d["vocab"]) == (
        "ref-causal", "tiny", "/models/tiny", "tiny-sha", VOCAB)
    assert d["protocol"] == lm[2].to_dict() and d["created"].endswith("Z")


def _tiny_disk(monkeypatch, free=1000):
    monkeypatch.setattr(cachedir, "free_disk", lambda directory: free)


def test_too_little_disk_is_refused_before_the_model_loads(lm, root, monkeypatch):
    _tiny_disk(monkeypatch)
    with pytest.raises(CacheSpaceError) as info:
        reference(lm, never, vocab_size=VOCAB)
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC and "\n" not in message
    needed = WINDOWS * (WINDOW - 1) * VOCAB * 2 + WINDOWS * WINDOW * 8 + WINDOWS * (WINDOW - 1) * 16
    assert message == (f"the reference (3 windows × 15 positions × 300 log-probs, fp16) needs "
                       f"{needed / 1e6:.1f} MB of disk; 0.0 MB free in {root}; use fewer or shorter windows")
    assert os.listdir(root) == []


def test_without_vocab_size_the_check_runs_after_the_first_window(lm, root, monkeypatch):
    _tiny_disk(monkeypatch)
    loads = Loads(lm[0])
    with pytest.raises(CacheSpaceError, match="needs .* of disk; .* free"):
        reference(lm, loads)
    assert loads.calls == 1 and os.listdir(root) == []


def test_too_little_memory_is_refused(lm, root, monkeypatch):
    monkeypatch.setattr(cachedir, "free_memory", lambda: 10_000)
    with pytest.raises(CacheSpaceError, match=r"needs .* of memory; 0\.0 MB available; use fewer") as info:
        reference(lm, never, vocab_size=VOCAB)
    assert info.value.errno == errno.ENOMEM


def test_a_huge_protocol_is_refused_by_the_real_probes(lm, root):
    # 3 windows x 15 positions x 10^13 log-probs x 2 bytes = 900 TB: no disk holds it; nothing is allocated
    with pytest.raises(CacheSpaceError, match=r"needs 900000\.0 GB of disk"):
        reference(lm, never, vocab_size=10**13)


def test_reference_is_cached_and_not_recomputed(setup):
    model, ids, protocol, info, ref = setup

    def must_not_load():
        raise AssertionError("the reference model was loaded although the reference is cached")

    again = causal_reference(must_not_load, ids, protocol, info.file_hash, progress=False)
    assert again.path == ref.path and torch.equal(again.nll, ref.nll) and torch.equal(again.top1, ref.top1)


def test_damaged_cache_is_recomputed(setup, tmp_path, monkeypatch):
    model, ids, protocol, info, ref = setup
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    first = causal_reference(lambda: model, ids[:1], protocol, "damaged", progress=False)
    first.path.write_bytes(b"not safetensors")
    again = causal_reference(lambda: model, ids[:1], protocol, "damaged", progress=False)
    assert torch.equal(again.nll, first.nll)


def test_unwritable_cache_fails_before_the_model_runs(setup, tmp_path, monkeypatch):
    _, ids, protocol, _, _ = setup
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "file" / "cache"))

    def must_not_load():
        raise AssertionError("the model ran although its result could not be stored")

    with pytest.raises(OSError, match="cannot create the cache directory .*LOWBIT_CACHE"):
        causal_reference(must_not_load, ids[:1], protocol, "unwritable", progress=False)
