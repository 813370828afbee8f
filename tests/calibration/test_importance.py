"""Calibration (calibration/importance.py): which text it reads, and the per-channel mean of x^2 it returns."""

import argparse
from collections import OrderedDict

import pytest
import torch
from torch import nn

from lowbit.calibration.importance import (
    DEFAULT_CALIBRATE,
    calibrate,
    calibration_paragraphs,
    calibration_windows,
    collect_importance,
    encoder_batches,
)
from lowbit.eval.encoder import MAX_TOKENS
from lowbit.eval.protocol import DEFAULT_WINDOWS, default_text, paragraphs, token_windows


class CharTokenizer:
    """One token per character: makes window arithmetic visible."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}


class Counting(nn.Module):
    """A one-Linear model that counts its forward calls (to prove nothing ran)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(1, 1)
        self.calls = 0

    def forward(self, ids):
        self.calls += 1
        return self.proj(ids.float().unsqueeze(-1))


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_pre_hooks for m in model.modules())


def test_the_documented_default_span_is_the_default():
    """--calibrate's help and the module docstring name the tokens the default reads: they must be these."""
    from lowbit.calibration import importance as calibration
    from lowbit.commands import common

    first, end = DEFAULT_WINDOWS * 512, (DEFAULT_WINDOWS + DEFAULT_CALIBRATE) * 512
    span = f"tokens {first:,}-{end - 1:,}"
    assert span in calibration.__doc__.replace("\n", " ")
    parser = argparse.ArgumentParser()
    common.add_calibrate_arg(parser)
    (action,) = [a for a in parser._actions if a.dest == "calibrate"]
    assert f"default {DEFAULT_CALIBRATE}: {span}" in action.help


def test_calibration_windows_follow_the_scored_ones():
    text = "".join(chr(65 + i % 26) for i in range(40))
    scored, _ = token_windows(CharTokenizer(), text, "t", window=4, windows=3)
    calib = calibration_windows(CharTokenizer(), text, "t", window=4, scored=3, count=2)
    assert calib.dtype == torch.int64 and calib.shape == (2, 4)
    assert calib.flatten().tolist() == [ord(c) for c in text[12:20]]  # starts at token scored * window
    everything, _ = token_windows(CharTokenizer(), text, "t", window=4, windows=5)
    assert torch.equal(everything[:3], scored) and torch.equal(everything[3:], calib)


def test_calibration_windows_of_the_real_protocol(smollm2):
    _, tokenizer, _, _ = smollm2
    text = default_text()
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    scored, _ = token_windows(tokenizer, text, "t", windows=DEFAULT_WINDOWS)
    calib = calibration_windows(tokenizer, text, "t", window=512, scored=DEFAULT_WINDOWS, count=3)
    assert torch.equal(calib.flatten(), ids[8192: 8192 + 3 * 512])  # window 17 onwards: tokens 8,192 ...
    assert torch.equal(scored.flatten(), ids[:8192])  # the scored ones end where calibration starts


def test_too_short_text_is_one_line_and_runs_nothing(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("abcdefghijklmnopqrst")  # 20 characters: 5 windows of 4
    model = Counting()
    with pytest.raises(ValueError) as err:
        calibrate(model, CharTokenizer(), "causal-lm", path, window=4, scored=2, count=5)
    assert str(err.value) == (f"text {path} holds 3 windows of 4 tokens after the 2 scored ones; asked for 5: "
                              "use --calibrate 3 or fewer, or a longer --text")
    assert model.calls == 0
    with pytest.raises(ValueError, match=r"holds 5 windows of 4 tokens, none after the 5 scored ones.*fewer --windows"):
        calibrate(model, CharTokenizer(), "causal-lm", path, window=4, scored=5, count=1)
    with pytest.raises(ValueError, match="--calibrate >= 1"):
        calibrate(model, CharTokenizer(), "causal-lm", path, window=4, scored=2, count=0)
    assert model.calls == 0
    assert calibrate(model, CharTokenizer(), "causal-lm", path, window=4, scored=2, count=3, progress=False)
    assert model.calls == 3 and no_hooks(model)


def test_importance_is_the_mean_square_of_each_input_channel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    batches = [torch.randn(5, 3), torch.randn(7, 3) * 3]
    imp = collect_importance(model, batches, progress=False)
    assert list(imp) == ["0", "2"] and no_hooks(model)
    x = torch.cat(batches)
    hidden = torch.relu(model[0](x)).detach()
    assert imp["0"].dtype == torch.float32 and imp["0"].shape == (3,)
    torch.testing.assert_close(imp["0"], (x.double() ** 2).mean(0).float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(imp["2"], (hidden.double() ** 2).mean(0).float(), rtol=1e-6, atol=0)
    # by hand, for one channel of one input
    one = collect_importance(model, [torch.tensor([[1.0, 2.0, 3.0], [3.0, 0.0, -1.0]])], layers=["0"], progress=False)
    assert one["0"].tolist() == [5.0, 2.0, 5.0]


def test_layers_reading_one_tensor_share_its_sums_correctly():
    class Attention(nn.Module):  # q and k read the same tensor, as in transformers' attention blocks
        def __init__(self):
            super().__init__()
            self.q, self.k, self.out = nn.Linear(2, 3), nn.Linear(2, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.out(self.q(x) * self.k(x))

    torch.manual_seed(1)
    model = Attention()
    batches = [torch.randn(4, 2), torch.randn(3, 2)]
    imp = collect_importance(model, batches, progress=False)
    x = torch.cat(batches)
    hidden = (model.q(x) * model.k(x)).detach()
    torch.testing.assert_close(imp["q"], (x.double() ** 2).mean(0).float(), rtol=1e-6, atol=0)
    assert torch.equal(imp["q"], imp["k"])
    torch.testing.assert_close(imp["out"], (hidden.double() ** 2).mean(0).float(), rtol=1e-6, atol=0)


def test_squares_beyond_float32_are_summed_in_float64():
    model = nn.Sequential(nn.Linear(1, 1))
    # 4 x (1e19)^2 = 4e38 overflows a float32 sum; the mean 1e38 does not
    imp = collect_importance(model, [torch.full((4, 1), 1e19)], progress=False)
    assert imp["0"].item() == pytest.approx(1e38, rel=1e-6)
    with pytest.raises(ValueError, match=r"mean square of 0's calibration activations reaches 1e\+40, beyond float32"):
        collect_importance(model, [torch.full((2, 1), 1e20)], progress=False)
    assert no_hooks(model)


def test_only_the_named_layers_and_names_are_checked():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert list(collect_importance(model, [torch.ones(1, 3)], layers=["2"], progress=False)) == ["2"]
    with pytest.raises(ValueError, match="no nn.Linear named '1' in the model"):
        collect_importance(model, [torch.ones(1, 3)], layers=["1"], progress=False)
    with pytest.raises(ValueError, match="layers= is empty"):
        collect_importance(model, [torch.ones(1, 3)], layers=[], progress=False)
    with pytest.raises(ValueError, match="no calibration inputs"):
        collect_importance(model, [], progress=False)


class Spare(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.spare = nn.Linear(2, 2), nn.Linear(2, 2)

    def forward(self, x):
        return self.used(x)  # spare is never called


def test_a_layer_never_called_is_an_error():
    model = Spare()
    assert list(collect_importance(model, [torch.ones(1, 2)], layers=["used"], progress=False)) == ["used"]
    with pytest.raises(ValueError, match="nn.Linear spare received no input during calibration"):
        collect_importance(model, [torch.ones(1, 2)], progress=False)
    assert no_hooks(model)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activations_name_the_layer_and_remove_the_hooks(bad):
    model = nn.Sequential(OrderedDict(first=nn.Linear(2, 3), act=nn.ReLU(), second=nn.Linear(3, 2)))
    with torch.no_grad():
        model.first.weight[1, 0] = bad  # the first layer's input is finite; its output channel 1 is not
    model.train()
    with pytest.raises(ValueError) as err:
        collect_importance(model, [torch.ones(2, 2), torch.ones(2, 2)], progress=False)
    what = "NaN" if bad != bad else "Inf"
    assert str(err.value).startswith(f"calibration activations of second hold {what}: in 1 of its 3 input channels "
                                     "(calibration batch 1 of 2)")
    assert "\n" not in str(err.value)
    assert no_hooks(model) and model.training  # hooks gone and the mode restored, even after the error


class Padded(nn.Module):
    """(B, T, in) inputs with an attention mask, as a padded encoder batch gives them."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(2, 2)
        self.pool = nn.Linear(2, 1)

    def forward(self, x, attention_mask):
        return self.pool(self.proj(x)[:, 0])  # (B, in) input: one row per sequence, like BERT's pooler


def test_padding_is_not_counted():
    model = Padded()
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]], [[5.0, 6.0], [100.0, 100.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    imp = collect_importance(model, [{"x": x, "attention_mask": mask}], progress=False)
    real = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    torch.testing.assert_close(imp["proj"], (real ** 2).mean(0))  # the padded 9s and 100s are left out
    first = model.proj(x[:, 0]).detach()
    torch.testing.assert_close(imp["pool"], (first ** 2).mean(0))


def test_embedded_model_every_linear_and_the_lm_head_by_hand(smollm2):
    model, tokenizer, info, _ = smollm2
    imp = calibrate(model, tokenizer, info.kind, scored=DEFAULT_WINDOWS, count=2, progress=False)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert list(imp) == list(linears) and "lm_head" in imp and len(imp) == 30 * 7 + 1
    for name, values in imp.items():
        assert values.dtype == torch.float32 and values.shape == (linears[name].in_features,)
        assert torch.isfinite(values).all() and (values > 0).all(), name
    assert no_hooks(model)
    # the LM head's input is the final hidden state: its mean square by hand
    ids = calibration_windows(tokenizer, default_text(), "t", scored=DEFAULT_WINDOWS, count=2)
    with torch.inference_mode():
        hidden = torch.cat([model.model(w[None]).last_hidden_state[0] for w in ids])
    torch.testing.assert_close(imp["lm_head"], (hidden.double() ** 2).mean(0).float(), rtol=1e-5, atol=0)
    # leaving the head out skips its logits (logits_to_keep) and changes no other layer's figure
    body = [n for n in linears if n != "lm_head"]
    without = calibrate(model, tokenizer, info.kind, scored=DEFAULT_WINDOWS, count=2, layers=body, progress=False)
    assert list(without) == body
    assert all(torch.equal(without[n], imp[n]) for n in body)


def test_encoder_paragraphs_follow_the_scored_ones(minilm):
    _, tokenizer, _ = minilm
    text = default_text()
    scored = paragraphs(text)
    rest = paragraphs(text, limit=None)[len(scored):]
    texts = calibration_paragraphs(tokenizer, text, "t", scored=len(scored), count=2)
    assert texts == rest[: len(texts)]
    lengths = [len(tokenizer(t, truncation=True, max_length=MAX_TOKENS)["input_ids"]) for t in texts]
    assert sum(lengths[:-1]) < 2 * 512 <= sum(lengths)  # as many as fill 2 x 512 tokens, no more
    with pytest.raises(ValueError, match=r"in the 3 paragraphs after the 2 scored ones; asked for 64 x 512: "):
        calibration_paragraphs(tokenizer, "\n\n".join(rest[:5]), "t", scored=2, count=64)


def test_encoder_calibration_on_minilm(minilm):
    model, tokenizer, info = minilm
    text = default_text()
    scored = len(paragraphs(text))
    imp = calibrate(model, tokenizer, info.kind, scored=scored, count=2, progress=False)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert list(imp) == list(linears) and len(imp) == 6 * 6 + 1  # 6 per layer and the pooler
    assert all(torch.isfinite(v).all() and (v >= 0).all() for v in imp.values())
    assert all((v > 0).all() for n, v in imp.items() if n != "pooler.dense")
    assert no_hooks(model)
    # by hand: the first query projection reads the embeddings (mean square over the unpadded tokens only);
    # the pooler reads each paragraph's first ([CLS]) hidden state, one row per paragraph
    texts = calibration_paragraphs(tokenizer, text, "t", scored=scored, count=2)
    batches = encoder_batches(tokenizer, texts, batch=4)
    lengths = torch.cat([b["attention_mask"].sum(1) for b in batches])
    assert len(lengths) == len(texts) and torch.equal(lengths, lengths.sort().values)  # batched shortest first
    assert any((b["attention_mask"] == 0).any() for b in batches)  # some rows are padded: the mask matters
    embedded, first = [], []
    with torch.inference_mode():
        for batch in batches:
            hidden = model(**batch, output_hidden_states=True).hidden_states
            embedded.append(hidden[0][batch["attention_mask"].bool()])
            first.append(hidden[-1][:, 0])
    expected = (torch.cat(embedded).double() ** 2).mean(0).float()
    torch.testing.assert_close(imp["encoder.layer.0.attention.self.query"], expected, rtol=1e-5, atol=0)
    # a few [CLS] channels of all-MiniLM-L6-v2 are ~1e-32: their mean square (~1e-63) is 0 in float32, as here
    expected = (torch.cat(first).double() ** 2).mean(0).float()
    torch.testing.assert_close(imp["pooler.dense"], expected, rtol=1e-5, atol=0)
    assert torch.equal(imp["pooler.dense"] == 0, expected == 0)
