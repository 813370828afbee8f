"""lowbit.models.load_model: the embedded models, local paths, hub ids, and load errors."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import pytest
import torch

from lowbit import load_model
from lowbit.errors import LowbitError, ModelLoadError
from lowbit.models import CAUSAL_LM, ENCODER, loader, resolve

from .helpers import sha256_of


def test_embedded_default_is_float32_eval_causal_lm(smollm2):
    model, tokenizer, info, seconds = smollm2
    print(f"embedded SmolLM2 loaded in {seconds:.1f} s")
    assert info.kind == CAUSAL_LM
    assert info.source == "smollm2"  # the name, which loads it from any directory
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M, tied head counted once
    # SmolLM2 ties its output head to the token embeddings; the GGUF file stores one tensor
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.decode(tokenizer("Hello world")["input_ids"]).endswith("Hello world")


def test_embedded_hash_is_the_file_sha256(smollm2):
    info = smollm2[2]
    assert info.file_hash == sha256_of(resolve(info.source)[1])
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.kind = "encoder"


def test_embedded_generates_text(smollm2):
    model, tokenizer, _, _ = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


@pytest.mark.parametrize("spec", [None, "smollm2", "SmolLM2"])
def test_default_names_resolve_to_the_packaged_gguf(spec):
    how, target = resolve(spec)
    assert how == "gguf" and Path(target).name == "SmolLM2-135M-Instruct.Q4_1.gguf" and Path(target).is_file()


def test_paths_and_hub_ids_resolve(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    assert resolve(gguf) == ("gguf", str(gguf))
    assert resolve(tmp_path) == ("directory", str(tmp_path))
    assert resolve("HuggingFaceTB/SmolLM2-135M") == ("hub", "HuggingFaceTB/SmolLM2-135M")
    assert resolve("minilm")[0] == "directory"


def test_minilm_is_a_float32_encoder(minilm):
    model, tokenizer, info = minilm
    assert info.kind == ENCODER and not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad():
        out = model(**tokenizer(["a sentence"], return_tensors="pt"))
    assert out.last_hidden_state.shape[-1] == 384  # all-MiniLM-L6-v2 hidden size


def test_directory_path_loads_like_the_name(minilm, tmp_path, monkeypatch):
    info = minilm[2]
    assert info.source == "minilm"
    directory = Path(resolve("minilm")[1])
    monkeypatch.chdir(directory.parent)
    _, _, by_path = load_model(directory.name)  # a relative path: recorded absolute
    assert by_path == dataclasses.replace(info, source=str(directory))
    assert Path(by_path.source).is_absolute() and (Path(by_path.source) / "model.safetensors").is_file()
    monkeypatch.chdir(tmp_path)  # and it loads again from anywhere
    assert load_model(by_path.source)[2] == by_path


def test_an_existing_relative_path_is_never_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "victim").mkdir()
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert resolve("victim") == ("directory", "victim")
    assert resolve("org/name") == ("directory", "org/name")
    monkeypatch.setattr(loader, "_load_hub", lambda repo_id, verify: pytest.fail(f"{repo_id} sent to the hub"))
    for spec in ("victim", "org/name"):
        with pytest.raises(ModelLoadError, match=f"^not a model directory \\(no config.json\\): {spec}$"):
            load_model(spec)


@pytest.mark.parametrize("spec", ["/nonexistent/model.gguf", "missing.gguf", "./no-such-dir", "~/no/such/model"])
def test_missing_paths_raise_model_load_error(spec):
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        load_model(spec)
    assert "\n" not in str(err.value)
    assert isinstance(err.value, ValueError) and isinstance(err.value, LowbitError)


def test_corrupt_gguf_raises_model_load_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file" * 100)
    with pytest.raises(ModelLoadError, match="bad.gguf") as err:
        load_model(bad)
    assert "\n" not in str(err.value)


def test_corrupt_safetensors_raises_model_load_error(tmp_path, minilm):
    src = Path(resolve(minilm[2].source)[1])
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, tmp_path / name)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="^cannot load model from .*: not a valid safetensors file") as err:
        load_model(tmp_path)
    assert "\n" not in str(err.value)


def test_checkpoint_missing_weights_is_refused(tmp_path, tiny_lm_dir):
    """transformers would fill the gap with random weights and only warn."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_lm_dir, tmp_path / "m")
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="1 weights missing from the checkpoint, e.g. model.layers.1.mlp.down"):
        load_model(tmp_path / "m")


def test_directory_without_config_and_non_model_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelLoadError, match="neither a directory nor a .gguf"):
        load_model(text)


@pytest.mark.slow
def test_gguf_path_loads_like_the_default(smollm2):
    info = smollm2[2]
    _, _, by_path = load_model(resolve(info.source)[1])
    assert by_path == dataclasses.replace(info, source=resolve(info.source)[1])


def test_a_transposed_tensor_is_named_with_both_shapes(tmp_path, tiny_lm_dir):
    """Issue 25, finding 13: transformers' error ended at "LlamaForCausalLM:" (now: "look at the above
    report!"), its detail only in a log."""
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_lm_dir, bad)
    tensors = load_file(bad / "model.safetensors")
    vocab = tensors["model.embed_tokens.weight"].shape[0]
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].T.contiguous()
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    expected = (f"tensor model.embed_tokens.weight in model.safetensors has shape [64, {vocab}]; the architecture "
                f"config.json describes has [{vocab}, 64]")
    with pytest.raises(ModelLoadError, match=re.escape(expected)) as err:
        load_model(bad)
    assert "\n" not in str(err.value)
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", "quantize", "--model", str(bad), "--format", "nf4",
                        "-o", str(tmp_path / "q")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(expected), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_a_directory_is_hashed_once_unless_verified(tmp_path, tiny_lm_dir, monkeypatch):
    """Issue 27, deliverable 7: a later load of the same files reads none of them for the hash; verify=True
    reads them all."""
    from lowbit.models import hashing

    monkeypatch.setattr(hashing, "_SETTLED_NS", 0)  # the copies are milliseconds old; the rule wants seconds
    directory = tmp_path / "m"
    shutil.copytree(tiny_lm_dir, directory)
    reads = []
    real = hashing._read
    monkeypatch.setattr(hashing, "_read", lambda f: (reads.append(Path(f.name).name), real(f))[1])
    first = load_model(directory)[2]
    hashed = sorted(p.name for p in hashing.model_files(directory))
    assert sorted(reads) == hashed == ["config.json", "model.safetensors"]
    assert load_model(directory)[2] == first and len(reads) == 2
    assert load_model(directory, verify=True)[2] == first and sorted(reads[2:]) == hashed
