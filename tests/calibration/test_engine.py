"""The calibration engine: a block run on caught inputs computes, to the bit, what it computes inside a full
forward, so every statistic served block by block equals the full-forward one (SmolLM2, all-MiniLM-L6-v2, a toy);
errors name the layer; the walk keeps one block's inputs and stops after the last block it needs."""

import pytest
import torch
from torch import nn

from lowbit.calibration.engine import Block, BlockPass, Consumer, serve
from lowbit.calibration.importance import calibration_batches, collect_importance
from lowbit.calibration.statistics import ABS_MEAN, HESSIAN, HESSIAN32, IMPORTANCE, Statistics
from lowbit.errors import InputError
from lowbit.eval.protocol import default_text, paragraphs


def full_forwards(model, batches, layers, wants, **extra):
    """The statistics as full forwards with hooks give them (how importance was collected before the engine)."""
    stats = Statistics(layers, wants, len(batches))
    with stats.hooked(), torch.inference_mode():
        for b, batch in enumerate(batches):
            stats.batch = b
            if isinstance(batch, dict):
                stats.mask = batch["attention_mask"].bool()
                model(**batch, **extra)
            else:
                stats.mask = None
                model(batch, **extra)
    return stats.result()


def walked(model, batches, layers, wants):
    """The statistics of ``layers`` in the blocks, served block by block on one stream, and each block's output."""
    found, outputs = {w: {} for w in wants}, []

    class Collect(Consumer):
        def __init__(self):
            self.layers, self.stream = tuple(layers), None

        def block(self, engine: BlockPass, block: Block) -> None:
            self.stream = self.stream or engine.stream()
            stats, outs = block.statistics(self.stream, block.layers(self.layers), wants)
            for w in wants:
                found[w].update(stats[w])
            outputs.append(outs)
            self.stream.advance(outs)

    serve(model, batches, [Collect()], progress=False)
    return found, outputs


def assert_equal(a: dict, b: dict):
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def linears(model, skip=()):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in skip}


def test_smollm2_block_by_block_equals_full_forwards(smollm2):
    model, tokenizer, info, _ = smollm2
    batches, _ = calibration_batches(tokenizer, info.kind, None, window=64, scored=2, count=2)
    inner = linears(model, skip=("lm_head",))
    # importance: the full forwards ran with the key/value cache on and only the last position's logits
    assert_equal(collect_importance(model, batches, layers=list(inner), progress=False),
                 full_forwards(model, batches, inner, [IMPORTANCE], logits_to_keep=1)[IMPORTANCE])
    # the head outside the blocks: its inputs replayed from the last block's outputs
    head = {"lm_head": model.lm_head, "model.layers.0.mlp.down_proj": model.model.layers[0].mlp.down_proj}
    assert_equal(collect_importance(model, batches, layers=list(head), progress=False),
                 full_forwards(model, batches, head, [IMPORTANCE])[IMPORTANCE])
    few = {n: inner[n] for n in ("model.layers.0.self_attn.q_proj", "model.layers.17.mlp.down_proj",
                                 "model.layers.29.self_attn.o_proj")}
    wants = [HESSIAN, HESSIAN32, ABS_MEAN]
    found, outputs = walked(model, batches, few, wants)
    expected = full_forwards(model, batches, few, wants, use_cache=False)
    for w in wants:
        assert_equal(found[w], expected[w])
    with torch.inference_mode():
        hidden = [model(b, use_cache=False, output_hidden_states=True).hidden_states for b in batches]
    assert len(outputs) == 30  # through the last block holding a layer asked for
    for i, outs in enumerate(outputs[:-1]):  # hidden_states[-1] has the final norm applied
        for b, out in enumerate(outs):
            assert torch.equal(out[0] if isinstance(out, tuple) else out, hidden[b][i + 1])


def test_minilm_block_by_block_equals_full_forwards(minilm):
    model, tokenizer, info = minilm
    batches, _ = calibration_batches(tokenizer, info.kind, None, scored=len(paragraphs(default_text())), count=2)
    assert any((b["attention_mask"] == 0).any() for b in batches)  # padding: the mask is applied
    every = linears(model)
    assert_equal(collect_importance(model, batches, progress=False),
                 full_forwards(model, batches, every, [IMPORTANCE])[IMPORTANCE])  # the pooler replayed after
    few = {n: every[n] for n in ("encoder.layer.0.attention.self.query", "encoder.layer.5.output.dense")}
    found, _ = walked(model, batches, few, [HESSIAN, ABS_MEAN])
    expected = full_forwards(model, batches, few, [HESSIAN, ABS_MEAN])
    assert_equal(found[HESSIAN], expected[HESSIAN])
    assert_equal(found[ABS_MEAN], expected[ABS_MEAN])


class ToyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.a(x)) + x


class Toy(nn.Module):
    def __init__(self, blocks=3):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([ToyBlock() for _ in range(blocks)])
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return self.head(x)


def toy_batches():
    return [torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]


def test_toy_importance_and_the_walk_stops_after_the_last_block_asked_for():
    model, data = Toy(), toy_batches()
    names = ["layers.0.a", "layers.1.a", "layers.2.a", "head"]
    assert_equal(collect_importance(model, data, layers=names, progress=False),
                 full_forwards(model, data, {n: model.get_submodule(n) for n in names}, [IMPORTANCE])[IMPORTANCE])
    calls = []
    model.layers[2].register_forward_pre_hook(lambda m, a: calls.append(1))
    collect_importance(model, data, layers=["layers.1.a"], progress=False)
    assert calls == []
    assert all(not m._forward_pre_hooks for m in model.layers[:2].modules())


def test_errors_name_the_layer_and_leave_no_hooks():
    model, data = Toy(), toy_batches()
    with pytest.raises(InputError, match="nn.Linear layers.1.unused received no input during calibration"):
        collect_importance(model, data, layers=["layers.0.a", "layers.1.unused"], progress=False)
    with torch.no_grad():
        model.layers[1].a.weight[0, 0] = float("nan")
    with pytest.raises(InputError, match=r"calibration activations of layers.2.a hold NaN: .* \(calibration batch 1 "
                                         r"of 3\)"):
        collect_importance(model, data, layers=["layers.0.a", "layers.2.a"], progress=False)
    found = []

    class Hessians(Consumer):
        layers = ("layers.2.a",)

        def block(self, engine, block):
            self.stream = getattr(self, "stream", None) or engine.stream()
            found.append(block.statistics(self.stream, block.layers(self.layers), [HESSIAN]))
            self.stream.advance(found[-1][1])

    with pytest.raises(InputError, match="calibration activations of layers.2.a hold NaN or Inf"):
        serve(model, data, [Hessians()], progress=False)
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert model.training  # left in the mode it was in
