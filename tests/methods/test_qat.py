"""Quantization-aware training: prepare, a few steps, convert; the converted model computes what was trained."""

import copy
from dataclasses import replace

import pytest
import torch

from lowbit import QuantConfig, QuantLinear, load_model
from lowbit.evaluate import materialize
from lowbit.methods.qat import QATLinear, convert, prepare
from lowbit.methods.qat_train import DivergedError, QATSettings, train
from lowbit.planning import QuantPlan


@pytest.fixture(scope="module")
def _tiny(tiny_lm_dir):
    return load_model(tiny_lm_dir)[0]


@pytest.fixture
def tiny(_tiny):
    """A fresh copy of the 2-layer model for each test (prepare changes it in place)."""
    return copy.deepcopy(_tiny)


@pytest.mark.parametrize("label", ["int3/32", "int2_asym/64", "nf4/32", "int4/32+had"])
def test_converted_model_computes_what_was_trained(tiny, label):
    teacher = copy.deepcopy(tiny)
    layers = prepare(tiny, QuantPlan.uniform(label))
    assert len(layers) == 14 and all(isinstance(m, QATLinear) for m in layers.values())
    assert not any(p.requires_grad for n, p in tiny.named_parameters() if "embed" in n or "norm" in n)
    windows = torch.randint(0, 1000, (3, 32), generator=torch.Generator().manual_seed(0))
    first = next(iter(layers.values()))
    before = first.weight.detach().clone(), first.quantizer.scale.detach().clone()
    losses = train(tiny, teacher, windows, QATSettings(steps=4, lr=1e-3, scale_lr=1e-3), progress=False)
    assert len(losses) == 4 and all(x >= 0 for x in losses)
    assert not torch.equal(first.weight, before[0]) and not torch.equal(first.quantizer.scale, before[1])
    ids = windows[:1]
    with torch.no_grad():
        trained = tiny(ids).logits
    report = convert(tiny, QuantPlan.uniform(label))
    assert sum(isinstance(m, QuantLinear) for m in tiny.modules()) == 14 == len(report.layers)
    materialize(tiny)
    with torch.no_grad():
        assert torch.equal(tiny(ids).logits, trained)


def test_refusals():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    for label, message in [("q4_k", "GGUF block format"), ("mxfp4", "as codes"), ("nf4+dq", r"\+dq"),
                           ("int4@mse", "scale search"), ("int8_outlier", "LLM.int8")]:
        with pytest.raises(ValueError, match=message):
            prepare(copy.deepcopy(model), QuantPlan.uniform(label))
    for kwargs, message in [({"steps": 0}, "--steps"), ({"lr": -1.0}, "--lr"), ({"loss": "mse"}, "--loss")]:
        with pytest.raises(ValueError, match=message):
            QATSettings(**({"steps": 1, "lr": 1e-5, "scale_lr": 1e-4} | kwargs))


def test_a_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path):
    teacher = copy.deepcopy(tiny)
    prepare(tiny, QuantPlan.uniform("int4/32"))
    windows = torch.randint(0, 1000, (2, 16))
    settings = QATSettings(steps=6, lr=1e-3, scale_lr=1e-3, checkpoint_every=2)
    calls = {"n": 0}

    def poison(module, args, out):
        calls["n"] += 1
        return out * float("nan") if calls["n"] > 3 else None  # replaces the output from the 4th step on

    hook = next(m for m in tiny.modules() if isinstance(m, QATLinear)).register_forward_hook(poison)
    with pytest.raises(DivergedError, match=r"at step 4; the last good checkpoint \(step 2\)"):
        train(tiny, teacher, windows, settings, checkpoint=tmp_path / "ck", progress=False)
    hook.remove()
    resumed = train(tiny, teacher, windows, settings, checkpoint=tmp_path / "ck", resume=True, progress=False)
    assert len(resumed) == 6


def test_an_interrupted_run_resumes_to_the_uninterrupted_one(tiny, tmp_path):
    windows = torch.randint(0, 1000, (3, 16), generator=torch.Generator().manual_seed(1))
    settings = QATSettings(steps=4, lr=1e-3, scale_lr=1e-3, checkpoint_every=2)
    straight, teacher = copy.deepcopy(tiny), copy.deepcopy(tiny)
    prepare(straight, QuantPlan.uniform("int3/32"))
    expected = train(straight, teacher, windows, settings, progress=False)
    prepare(tiny, QuantPlan.uniform("int3/32"))
    calls = {"n": 0}

    def interrupt(module, args):
        calls["n"] += 1
        if calls["n"] == 3:  # Ctrl-C during the third step
            raise KeyboardInterrupt

    hook = next(m for m in tiny.modules() if isinstance(m, QATLinear)).register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(tiny, teacher, windows, settings, checkpoint=tmp_path / "ck", progress=False)
    hook.remove()
    with pytest.raises(ValueError, match="belongs to another run"):
        train(tiny, teacher, windows, QATSettings(steps=5, lr=1e-3, scale_lr=1e-3, checkpoint_every=2),
              checkpoint=tmp_path / "ck", resume=True, progress=False)
    resumed = train(tiny, teacher, windows, settings, checkpoint=tmp_path / "ck", resume=True, progress=False)
    assert resumed == expected
    for a, b in zip(straight.parameters(), tiny.parameters(), strict=True):
        assert torch.equal(a, b)


def test_training_can_start_from_a_quantized_weight(tiny):
    """Seeded with another method's rounding (GPTQ's, here plain int4 with a searched scale), QAT begins at
    exactly what that rounding computes."""
    from lowbit.layers.surgery import linears, quantize_weight

    config = QuantConfig.parse("int4/32")
    start = {names[0]: quantize_weight(m.weight, replace(config, search="mse")) for names, m in linears(tiny)
             if "lm_head" not in names[0]}
    other = copy.deepcopy(tiny)
    layers = prepare(tiny, QuantPlan.uniform(config), start=start)
    for name, layer in layers.items():
        with torch.no_grad():
            assert torch.equal(layer.quantizer(layer.weight), start[name].dequantize())
    with pytest.raises(ValueError, match="cannot seed"):
        prepare(other, QuantPlan.uniform("int4/64"), start=start)


def test_a_checkpoint_directory_holding_a_users_file_is_not_replaced(tmp_path):
    """Issue 25 #2 for the QAT checkpoint: it is replaced only while it holds just what save_checkpoint wrote."""
    import os

    from lowbit.methods.qat_train import STATE_JSON, STATE_TENSORS, _only_a_checkpoint, save_checkpoint

    model = torch.nn.Linear(4, 4)
    opt = torch.optim.Adam(model.parameters())
    ckpt = tmp_path / "out.qat-checkpoint"
    save_checkpoint(ckpt, model, opt, {"format": "int4"}, [1.0])
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([STATE_JSON, STATE_TENSORS])
    assert oct(os.stat(ckpt / STATE_TENSORS).st_mode & 0o777) == oct(0o666 & ~_umask_now())
    assert _only_a_checkpoint(ckpt)
    (ckpt / "notes.txt").write_text("mine")
    assert not _only_a_checkpoint(ckpt)
    with pytest.raises(FileExistsError):
        save_checkpoint(ckpt, model, opt, {"format": "int4"}, [1.0, 0.5])
    assert (ckpt / "notes.txt").read_text() == "mine"


def _umask_now() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
