"""A streamed `lowbit quantize` stopped anywhere (SIGKILL, Ctrl-C, a full disk) goes on with --resume from its last
finished shard (a calibrated plan: from the end of its last block all in finished shards) and writes the bytes an
uninterrupted run writes; other settings, or no --resume, are refused."""

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
        import lowbit.files.spill as spill

        setattr(os, "replace", self._counted(os.replace))
        setattr(os, "link", self._counted(os.link))
        setattr(partial, "save_tensors", self._counted(partial.save_tensors, path=1))  # a state
        setattr(spill.Spill, "write", self._counted(spill.Spill.write, path=2))  # a shard

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
    from lowbit.files.spill import Spill

    write, calls = Spill.write, []

    def failing(self, names, path, *more):
        calls.append(path)
        if len(calls) == n:
            raise error
        write(self, names, path, *more)

    monkeypatch.setattr(Spill, "write", failing)


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
        ("--resume", "--format", "nf4@amse"): r"other settings \(--format/--plan: nf4 then, nf4@amse now\)",
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


@pytest.fixture(scope="module")
def deeper(tmp_path_factory) -> tuple[Path, Path]:
    """``(checkpoint, text)``: a 3-layer bf16 Llama like ``checkpoint``'s (more block ends to stop after), and a
    text of its words to calibrate on."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("calibrated")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory / "model", max_shard_size="40KB")
    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, **{f"w{i}": i for i in range(1, 300)}}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(directory / "model")
    rng = random.Random(0)
    (directory / "text.txt").write_text(" ".join(f"w{rng.randrange(1, 300)}" for _ in range(200)))
    return directory / "model", directory / "text.txt"


def calibrated(deeper, out, label, *more) -> list[str]:
    """Two windows of 16 tokens after one scored window: a few milliseconds a block."""
    checkpoint, text = deeper
    return [*quantize(checkpoint, out, "--format", label), "--calibrate", "2", "--window", "16", "--windows", "1",
            "--text", str(text), *more]


CALIBRATED = ("nf4/32+dq+awq@amse", "nf4/32+dq+had+gptq@amse")


@pytest.fixture(scope="module")
def calibrated_runs(deeper, tmp_path_factory) -> dict[str, tuple[dict, Steps]]:
    """Each calibrated label's uninterrupted files, and the steps it took."""
    runs = {}
    for label in CALIBRATED:
        out = tmp_path_factory.mktemp("calibrated-reference") / "q"
        steps = Steps(str(out.parent))
        with pytest.MonkeyPatch.context() as m:
            steps.install(m.setattr)
            assert main(calibrated(deeper, out, label)) == 0
        runs[label] = read_back(out), steps
    return runs


def blocks_done(out) -> int:
    """The blocks the state of an interrupted calibrated run's last finished shard says are done (0: none)."""
    state = json.loads((partial_path(out) / "manifest.json").read_text())["state"]
    info = state and state["info"]
    if not info:
        return 0
    return 3 if info["parts"] else info.get("pass", {}).get("engine", {}).get("blocks", 0)


def killed_and_resumed(label, deeper, calibrated_runs, tmp_path, capsys, points) -> list[int]:
    """The calibrated run of ``label`` killed with SIGKILL at each of ``points`` (``(step, when)``, as ``Steps``
    counts them) and resumed: the files are the uninterrupted run's. Returns the blocks each resume went on after."""
    reference, _ = calibrated_runs[label]
    out = tmp_path / "q"
    argv = calibrated(deeper, out, label)
    continued = []
    for n, when in points:
        child = killed_at(argv, tmp_path, n, when)
        assert child.returncode == -signal.SIGKILL, (n, when, child.stderr)
        continued.append(blocks_done(out) if partial_path(out).exists() else 0)
        capsys.readouterr()
        assert main([*argv, "--resume"]) == 0, (n, when, capsys.readouterr().err)
        assert not partial_path(out).exists() and [p.name for p in tmp_path.iterdir()] == ["q"]
        assert read_back(out) == reference, (n, when)
        shutil.rmtree(out)
    return continued


@pytest.mark.parametrize("label", CALIBRATED)
def test_a_calibrated_run_killed_after_some_blocks_resumes_from_its_last_block(label, deeper, calibrated_runs,
                                                                               tmp_path, capsys):
    """SIGKILL inside a shard's (or a state's) write past the first third of the run: --resume goes on from the
    last block whose layers are all in finished shards, to the uninterrupted files (one process killed: a
    dozen seconds; more places below, marked slow)."""
    reference, steps = calibrated_runs[label]
    assert len([f for f in reference if f.startswith("model-")]) >= 8  # many shards, many places to stop
    point = (random.Random(label).choice([w for w in steps.writes if w > steps.count // 3]), "mid")
    assert killed_and_resumed(label, deeper, calibrated_runs, tmp_path, capsys, [point])[0] > 0  # some blocks in


@pytest.mark.slow  # 14 processes started and killed: two minutes on 2 cores
@pytest.mark.parametrize("label", CALIBRATED)
def test_a_calibrated_run_killed_anywhere_resumes_to_the_same_bytes(label, deeper, calibrated_runs, tmp_path,
                                                                   capsys):
    _, steps = calibrated_runs[label]
    rng = random.Random(f"anywhere {label}")
    points = [(rng.randrange(1, steps.count), rng.choice(["before", "after"])) for _ in range(5)]
    killed_and_resumed(label, deeper, calibrated_runs, tmp_path, capsys,
                       [*points, (rng.choice(steps.writes), "mid"), (steps.count - 1, "after")])


def test_a_calibrated_run_with_other_settings_is_refused(deeper, calibrated_runs, tmp_path, monkeypatch, capsys):
    label, out, text = CALIBRATED[0], tmp_path / "q", tmp_path / "text.txt"
    shutil.copy(deeper[1], text)
    with monkeypatch.context() as m:
        stop_at(m, 9, KeyboardInterrupt())  # some blocks in
        assert main(calibrated(deeper, out, label, "--text", str(text))) == 130
    assert blocks_done(out) > 0
    kept = {p.name: p.read_bytes() for p in partial_path(out).iterdir()}
    other = tmp_path / "other.txt"
    other.write_text(text.read_text().replace("w1", "w2"))
    refusals = {
        ("--calibrate", "3"): r"\(--calibrate: 2 then, 3 now\)",
        ("--window", "8"): r"\(--window: 16 then, 8 now\)",
        ("--windows", "2"): r"\(the calibration tokens: 16-47 then, 32-63 now\)",
        ("--keep-dtype", "fp32"): r"\(--keep-dtype: bfloat16 then, float32 now\)",
        ("--format", "nf4/32+dq+awq@mse"): r"\(--format/--plan: nf4/32\+dq\+awq@amse then, nf4/32\+dq\+awq@mse now\)",
        ("--text", str(other)): "--text differs",
    }
    for more, said in refusals.items():
        assert main([*calibrated(deeper, out, label, "--text", str(text), "--resume"), *more]) == 2  # the last wins
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("lowbit quantize: error: ") and "other settings" in err and re.search(said, err), err
    text.write_text(other.read_text())  # the same file, other words
    assert main(calibrated(deeper, out, label, "--text", str(text), "--resume")) == 2
    assert "(the calibration inputs' sha256 differs)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in partial_path(out).iterdir()} == kept and not out.exists()
    shutil.copy(deeper[1], text)
    assert main(calibrated(deeper, out, label, "--text", str(text), "--resume")) == 0
    assert read_back(out) == calibrated_runs[label][0] and not partial_path(out).exists()
