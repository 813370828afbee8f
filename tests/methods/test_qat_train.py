"""QAT's training loop: a diverging loss stops at the last good checkpoint, an interrupted run resumes to the
uninterrupted one, and a checkpoint directory holding a user's file is never replaced."""

import copy
import os

import pytest
import torch

from lowbit.methods.qat import QATLinear, prepare
from lowbit.methods.qat_train import DivergedError, QATSettings, train
from lowbit.planning import QuantPlan


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


def test_a_checkpoint_directory_holding_a_users_file_is_not_replaced(tmp_path):
    """Issue 25 #2 for the QAT checkpoint: it is replaced only while it holds just what save_checkpoint wrote."""

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

    mask = os.umask(0)
    os.umask(mask)
    return mask
