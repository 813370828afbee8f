"""A streamed `lowbit quantize` stopped anywhere (SIGKILL, Ctrl-C, a full disk) goes on with --resume from its last
finished shard and writes the bytes an uninterrupted run writes; other settings, or no --resume, are refused."""

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from lowbit.cli import main
from lowbit.files.partial import partial_path

# a shard every few layers' parts: about ten of them for the checkpoint below
SHARD = "8KB"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A 2-layer bf16 Llama in three shards with a word-level tokenizer (nothing of SmolLM2 to convert: fast)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("resume") / "model"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory, max_shard_size="40KB")
    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, **{f"w{i}": i for i in range(1, 300)}}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(directory)
    return directory


def quantize(checkpoint, out, *more) -> list[str]:
    return ["quantize", "--model", str(checkpoint), "-o", str(out), "--shard-size", SHARD, *more]


def read_back(directory) -> dict:
    """``{file: bytes}``; lowbit.json parsed, without the one figure that is a time (quantize.seconds)."""
    files = {p.name: p.read_bytes() for p in Path(directory).iterdir()}
    meta = json.loads(files.pop("lowbit.json"))
    meta["quantize"].pop("seconds")
    return files | {"lowbit.json": meta}


class Steps:
    """Counts the steps that change files under ``where`` (a shard, a state or a manifest written; a rename; a
    link into the output) and, at the ``n``-th, kills the process with SIGKILL: ``before`` or ``after`` the step,
    or ``mid`` a shard's write (half its bytes on disk, in the temp safetensors writes them to)."""

    def __init__(self, where: str, n: int = 0, when: str = "never"):
        self.where, self.n, self.when, self.count = where, n, when, 0
        self.writes: list[int] = []  # which steps write a shard or a state

    def install(self, setattr) -> None:
        import lowbit.files.partial as partial

        setattr(os, "replace", self._counted(os.replace))
        setattr(os, "link", self._counted(os.link))
        setattr(partial, "save_tensors", self._counted(partial.save_tensors, path=1))

    def _counted(self, f, path: int = 0):
        def step(*args, **kwargs):
            if not str(args[path]).startswith(self.where):  # the lowbit cache's files
                return f(*args, **kwargs)
            self.count += 1
            if path:
                self.writes.append(self.count)
            if self.count == self.n and self.when == "mid" and path:  # safetensors' own temp, half written
                Path(args[path]).with_name(".tmpK1ll3d").write_bytes(b"x" * 4000)
            if self.count == self.n and self.when in ("before", "mid"):
                os.kill(os.getpid(), signal.SIGKILL)
            result = f(*args, **kwargs)
            if self.count == self.n and self.when == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        return step


_CHILD = ("import sys; from tests.io.test_resume import Steps; Steps(sys.argv[1], int(sys.argv[2]), sys.argv[3])"
          ".install(setattr); from lowbit.cli import main; sys.exit(main(sys.argv[4:]))")


def killed_at(argv, where, n: int, when: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _CHILD, str(where), str(n), when, *argv], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).parents[2])


@pytest.fixture(scope="module")
def uninterrupted(checkpoint, tmp_path_factory) -> tuple[dict, Steps]:
    """The files of an uninterrupted run, and the steps it took."""
    out = tmp_path_factory.mktemp("reference") / "q"
    steps = Steps(str(out.parent))
    with pytest.MonkeyPatch.context() as m:
        steps.install(m.setattr)
        assert main(quantize(checkpoint, out, "--format", "nf4")) == 0
    files = read_back(out)
    assert len([f for f in files if f.startswith("model-")]) >= 8  # many shards, many places to stop
    return files, steps


@pytest.fixture(scope="module")
def reference(uninterrupted) -> dict:
    return uninterrupted[0]


def test_a_run_killed_anywhere_resumes_to_the_same_bytes(checkpoint, uninterrupted, tmp_path, capsys):
    reference, steps = uninterrupted
    out = tmp_path / "q"
    argv = quantize(checkpoint, out, "--format", "nf4")
    rng = random.Random(27)
    # three random places (one inside a shard's write), and the last step: the output renamed into place, its
    # partial not yet removed
    points = [(rng.randrange(1, steps.count), "before"), (rng.choice(steps.writes), "mid"),
              (rng.randrange(1, steps.count), "after"), (steps.count, "after")]
    for n, when in points:
        child = killed_at(argv, tmp_path, n, when)
        assert child.returncode == -signal.SIGKILL, (n, when, child.stderr)
        left = partial_path(out)
        finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in left.glob("shard-*")}
        capsys.readouterr()
        code = main([*argv, "--resume"])
        assert not left.exists() and [p.name for p in tmp_path.iterdir()] == ["q"]  # no temps either
        if (n, when) == (steps.count, "after"):  # the output was complete: the partial goes, the output stays
            assert code == 2 and "output exists" in capsys.readouterr().err
        else:
            assert code == 0, (n, when, capsys.readouterr().err)
        assert read_back(out) == reference
        shards = sorted(out.glob("model-*"))
        for i, (name, stat) in enumerate(sorted(finished.items())):  # linked into the output, never rewritten
            assert (shards[i].stat().st_ino, shards[i].stat().st_mtime_ns) == stat, name
        shutil.rmtree(out)


def stop_at(monkeypatch, n: int, error: BaseException) -> None:
    """The n-th shard write raises ``error``, once."""
    import lowbit.files.partial as partial

    write, calls = partial.save_tensors, []

    def failing(tensors, path):
        calls.append(path)
        if len(calls) == n:
            raise error
        write(tensors, path)

    monkeypatch.setattr(partial, "save_tensors", failing)


def test_other_settings_are_refused_and_the_same_ones_go_on(checkpoint, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "q"
    with monkeypatch.context() as m:
        stop_at(m, 3, KeyboardInterrupt())
        assert main(quantize(checkpoint, out, "--format", "nf4")) == 130
    assert f"the finished shards stay in {partial_path(out)}; the same command with --resume continues" in \
        capsys.readouterr().err
    kept = {p.name: p.read_bytes() for p in partial_path(out).iterdir()}
    refusals = {
        (): "holds 2 finished shards of an interrupted run writing .*: pass --resume to continue it, or --overwrite "
            "to discard it",
        ("--resume", "--format", "q4_0"): r"other settings \(--format/--plan: nf4 then, q4_0 now\)",
        ("--resume", "--format", "nf4", "--keep-dtype", "fp32"): r"\(--keep-dtype: bfloat16 then, float32 now\)",
        ("--resume", "--format", "nf4", "--shard-size", "9KB"): r"\(--shard-size: 8000 then, 9000 now\)",
        ("--resume", "--format", "nf4@amse"): "--resume continues a quantize written as it is read; nf4@amse "
                                              "calibrates",
    }
    for more, said in refusals.items():
        argv = quantize(checkpoint, out, *more) if "--format" in more else quantize(checkpoint, out, "--format",
                                                                                      "nf4", *more)
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("lowbit quantize: error: ") and re.search(said, err), err
    assert {p.name: p.read_bytes() for p in partial_path(out).iterdir()} == kept and not out.exists()
    assert main(quantize(checkpoint, out, "--format", "nf4", "--resume")) == 0
    assert "(continuing the 2 shards an interrupted run finished)" in capsys.readouterr().out.replace("\n", "")
    assert read_back(out) == reference and not partial_path(out).exists()


def test_overwrite_discards_an_interrupted_run(checkpoint, reference, tmp_path, monkeypatch):
    out = tmp_path / "q"
    with monkeypatch.context() as m:
        stop_at(m, 4, KeyboardInterrupt())
        assert main(quantize(checkpoint, out, "--format", "q4_0")) == 130
    assert main(quantize(checkpoint, out, "--format", "nf4", "--overwrite")) == 0
    assert read_back(out) == reference and not partial_path(out).exists()


def test_resume_with_nothing_to_resume_starts_from_the_beginning(checkpoint, reference, tmp_path):
    assert main(quantize(checkpoint, tmp_path / "q", "--format", "nf4", "--resume")) == 0
    assert read_back(tmp_path / "q") == reference


@pytest.mark.parametrize("where", ["shard", "output"])
def test_a_disk_that_fills_midway_is_one_line_and_resume_completes(checkpoint, reference, tmp_path, monkeypatch,
                                                                   capsys, where):
    """ENOSPC as safetensors raises it while a shard is written (the third); EDQUOT while the files beside the
    tensors are (every shard finished). The input is untouched, nothing half-written counts."""
    out = tmp_path / "q"
    model = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    with monkeypatch.context() as m:
        if where == "shard":
            stop_at(m, 3, SafetensorError("Error while serializing: No space left on device (os error 28)"))
        else:
            def quota(*args):
                raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

            m.setattr("lowbit.io.streamed.write_model_files", quota)
        capsys.readouterr()
        assert main(quantize(checkpoint, out, "--format", "nf4")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if "error" in line]) == 1, err
    shards = 2 if where == "shard" else len([f for f in reference if f.startswith("model-")])
    assert err[-1].startswith(f"lowbit quantize: error: the disk filled while writing {out} (")
    assert " MB more needed, " in err[-1] and f" MB free; its {shards} finished shards stay in " \
        f"{partial_path(out)}: free some space and run the same command with --resume to continue" in err[-1]
    assert sorted(p.name for p in partial_path(out).iterdir()) == \
        ["manifest.json", *(f"shard-{i:05d}.safetensors" for i in range(1, shards + 1))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.partial"]
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == model
    assert main(quantize(checkpoint, out, "--format", "nf4", "--resume")) == 0
    assert read_back(out) == reference
