"""LLM.int8()'s outlier analysis: counts on planted activations, the paper's criteria, the same counts from a
model read one block at a time, and `lowbit outliers`."""

import json

import pytest
import torch
from torch import nn

from lowbit import load_model
from lowbit.cli import main
from lowbit.eval.outliers import collect_outliers, outlier_report
from lowbit.models.lazy import load_lazily


class Block(nn.Module):
    """q and k read the block's input, the up projection a copy of it; the block passes its input on unchanged
    (the hidden states are what the test plants, the layers' outputs are ignored)."""

    def __init__(self, hidden, plant):
        super().__init__()
        self.q, self.k, self.up, self.down = (nn.Linear(hidden, 4), nn.Linear(hidden, 4), nn.Linear(hidden, 32),
                                              nn.Linear(32, hidden))
        self.plant = plant

    def forward(self, x):
        self.q(x), self.k(x)
        h = x.clone()
        if self.plant:
            h[0, 0, 9] = -7.0  # one position of one layer: below both criteria
        self.down(self.up(h))
        return x


class Blocks(nn.Module):
    """Four blocks, the first planting one outlier of its own, and a head outside them."""

    def __init__(self, hidden=16):
        super().__init__()
        self.layers = nn.ModuleList(Block(hidden, plant=i == 0) for i in range(4))
        self.head = nn.Linear(hidden, 3)

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return self.head(x)


def planted(batch=2, tokens=50, hidden=16):
    x = torch.randn(batch, tokens, hidden).clamp(-3, 3)
    x[:, :20, 3] = 8.0  # dimension 3 in 40% of the positions of every hidden state: systematic
    x[0, :2, 5] = 6.0  # dimension 5 in 2 of 100 positions (>= is the rule): in every layer, too few positions
    return x


def test_counts_and_the_papers_criteria():
    model = Blocks()
    stats = collect_outliers(model, [planted(), planted()], 6.0, progress=False)
    assert stats["layers.0.k"].shares_input_with == "layers.0.q" and stats["layers.0.q"].shares_input_with is None
    assert stats["layers.1.up"].positions == 200 and stats["layers.1.up"].counts[3] == 80
    assert stats["layers.0.up"].counts[9] == 2 and stats["layers.1.up"].counts[9] == 0
    assert stats["head"].positions == 200 and stats["head"].block is None  # served after the blocks
    report = outlier_report(stats, 6.0, 16)
    assert report["blocks"] == 4
    assert report["hidden_inputs"] == [f"layers.{i}.{p}" for i in range(4) for p in ("q", "up")]
    by_dim = {f["dim"]: f for f in report["features"]}
    assert set(by_dim) == {3, 5, 9} and report["systematic"] == [3]
    assert by_dim[3]["layer_share"] == 1.0 and by_dim[3]["position_share"] == pytest.approx(0.4)
    assert by_dim[5]["layer_share"] == 1.0 and by_dim[5]["position_share"] == pytest.approx(0.02)
    assert by_dim[9]["layers"] == 1 and by_dim[9]["max_abs"] == 7.0
    layer = next(r for r in report["layers"] if r["name"] == "layers.0.down")
    assert layer["dims"] == [] and layer["in_features"] == 32  # the contraction's input is reported, not judged
    with pytest.raises(ValueError, match="threshold is a finite number > 0"):
        collect_outliers(model, [planted()], 0.0, progress=False)
    bad = planted()
    bad[1, 4, 0] = float("nan")
    with pytest.raises(ValueError, match="the input of layers.0.q holds NaN"):
        collect_outliers(model, [bad], 6.0, progress=False)


def linears_in_memory(model):
    """The indices of ``model``'s blocks with an nn.Linear weight off the meta device (the walk of a model read
    block by block keeps a block's norms and biases: kilobytes)."""
    return [i for i, b in enumerate(model.model.layers)
            if any(not m.weight.is_meta for m in b.modules() if isinstance(m, nn.Linear))]


def assert_same(a, b):
    assert list(a) == list(b)
    for name in a:
        assert a[name].positions == b[name].positions and a[name].block == b[name].block, name
        assert torch.equal(a[name].counts, b[name].counts) and torch.equal(a[name].peak, b[name].peak), name


def test_a_model_read_block_by_block_counts_what_the_model_in_memory_does(tiny_lm_dir):
    model, _, _ = load_model(tiny_lm_dir)
    lazy, _, _, weights = load_lazily(tiny_lm_dir)
    assert weights is not None
    batches = [torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(i))
               for i in range(2)]
    whole = collect_outliers(model, batches, 0.05, progress=False)  # random weights: small activations
    seen = []
    hooks = [b.register_forward_hook(lambda m, a, out, i=i: seen.append((i, linears_in_memory(lazy))))
             for i, b in enumerate(lazy.model.layers)]
    try:
        read = collect_outliers(lazy, batches, 0.05, weights=weights, progress=False)
    finally:
        for h in hooks:
            h.remove()
    assert_same(whole, read)
    assert whole["lm_head"].counts.sum() > 0 and whole["model.layers.1.mlp.down_proj"].counts.sum() > 0
    assert seen and all(found == [i] for i, found in seen)


@pytest.mark.slow  # SmolLM2 walked twice on 2 windows of 128 tokens: ~30 s
def test_smollm2_read_block_by_block_counts_what_the_model_in_memory_does(smollm2):
    from lowbit.calibration.importance import calibration_batches

    model, tokenizer, info, _ = smollm2
    lazy, _, _, weights = load_lazily(None)
    assert weights is not None, "the embedded SmolLM2's converted safetensors are cached after its first load"
    batches, _ = calibration_batches(tokenizer, info.kind, None, window=128, scored=16, count=2)
    whole = collect_outliers(model, batches, 6.0, progress=False)
    assert_same(whole, collect_outliers(lazy, batches, 6.0, weights=weights, progress=False))
    assert len(whole) == 30 * 7 + 1 and sum(int(s.counts.sum()) for s in whole.values()) > 0


def test_outliers_command_on_minilm(tmp_path, capsys):
    """The README's finding: one systematic feature in all-MiniLM-L6-v2's hidden states, dimension 223."""
    out = tmp_path / "o.json"
    assert main(["outliers", "--model", "minilm", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["systematic"] == [223] and report["hidden_size"] == 384 and report["blocks"] == 6
    assert len(report["layers"]) == 37 and report["threshold"] == 6.0
    assert "1 systematic outlier feature: 223" in capsys.readouterr().out


def test_outliers_command_refuses_bad_input(tiny_lm_dir, tmp_path, capsys):
    assert main(["outliers", "--model", str(tiny_lm_dir), "--threshold", "-1"]) == 2
    assert "--threshold is a finite number > 0" in capsys.readouterr().err
    assert main(["outliers", "--model", str(tiny_lm_dir), "--window", "64", "--windows", "1", "--calibrate",
                 "100000"]) == 2
    assert "--calibrate" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
