"""A model quantized as it is read (io.streamed): transformers' sharded layout, which load_quantized reads, and
the output's disk checked before anything is read."""

import json

import torch

from lowbit.files.shards import INDEX
from lowbit.io import load_quantized, save_quantized
from lowbit.io.streamed import output_bytes, quantize_to_directory
from lowbit.models.lazy import load_lazily
from lowbit.planning import QuantPlan

from .helpers import quantized


def test_a_model_streamed_to_shards_loads_back_as_saved_whole(tiny_lm_dir, tmp_path):
    """quantize_to_directory past its shard size writes transformers' layout, which load_quantized reads."""
    model, tokenizer, info, plan, report = quantized(tiny_lm_dir, "nf4/32+dq")
    save_quantized(model, tokenizer, info, report, plan, tmp_path / "whole")
    lazy, tokenizer, info, weights = load_lazily(tiny_lm_dir)
    quantize_to_directory(lazy, weights, tokenizer, info, plan, tmp_path / "sharded", shard_bytes=1 << 20,
                          progress=False)
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) >= 3 and INDEX in files and "model.safetensors" not in files
    meta = json.loads((tmp_path / "sharded" / "lowbit.json").read_text())
    assert meta["files"] == files  # what a later --overwrite may replace
    (whole, _, _), (streamed, _, _) = load_quantized(tmp_path / "whole"), load_quantized(tmp_path / "sharded")
    ids = torch.arange(100, 164)[None]
    with torch.inference_mode():
        assert torch.equal(whole(ids).logits, streamed(ids).logits)
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight


def test_a_disk_too_small_is_refused_before_anything_is_read(tiny_lm_dir, tmp_path, monkeypatch, capsys):
    from lowbit.cli import main

    lazy, tokenizer, info, weights = load_lazily(tiny_lm_dir)
    need = output_bytes(lazy, QuantPlan.uniform("nf4"), torch.float32)
    model, _, _, plan, report = quantized(tiny_lm_dir, "nf4")
    saved = save_quantized(model, tokenizer, info, report, plan, tmp_path / "whole")
    stored = sum(p.stat().st_size for p in saved.iterdir())
    assert stored <= need <= stored + (64 << 20)  # every byte counted, and the files beside the tensors bounded
    monkeypatch.setattr("lowbit.cachedir.free_disk", lambda directory: need - 1)
    assert main(["quantize", "--model", str(tiny_lm_dir), "--format", "nf4", "-o", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the quantized model needs" in err and "free some space, or write it elsewhere with -o" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["whole"]
