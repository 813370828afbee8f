"""save_quantized / load_quantized: safetensors + JSON, atomic, bit-exact round trip."""

import json
import os

import pytest
import torch

from lowbit import QuantLinear
from lowbit.errors import ModelLoadError
from lowbit.files.atomic import atomic_dir
from lowbit.io import load_quantized, save_quantized

from .helpers import quantized


@pytest.mark.parametrize("label", ["nf4+dq", "q4_0", "nvfp4", "int3_asym/128"])
def test_round_trip_logits_bitwise_equal(tiny_lm_dir, tmp_path, label):
    model, tokenizer, info, config, report = quantized(tiny_lm_dir, label)
    out = save_quantized(model, tokenizer, info, report, config, tmp_path / "q")
    loaded, _, meta = load_quantized(out)
    ids = torch.arange(100, 164)[None]
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert meta["config"]["label"] == label and meta["model"]["file_hash"] == info.file_hash
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == len(report.layers) == 14
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tying survives
    assert sorted(os.listdir(tmp_path)) == ["q"]  # no temp directory left behind


def test_saved_files_hold_no_pickle(tiny_lm_dir, tmp_path):
    model, tokenizer, info, config, report = quantized(tiny_lm_dir, "int8")
    out = save_quantized(model, tokenizer, info, report, config, tmp_path / "q")
    names = sorted(os.listdir(out))
    assert "model.safetensors" in names and "lowbit.json" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl", ".pth"))]
    layer = json.loads((out / "lowbit.json").read_text())["layers"]["model.layers.0.self_attn.q_proj"]
    assert layer == {"format": "int8", "format_id": 7, "shape": [64, 64], "dtype": "float32", "block_size": 64,
                     "double_quant": False, "parts": ["codes", "scales"], "label": "int8"}


def test_existing_directory_is_kept_unless_overwrite(tiny_lm_dir, tmp_path):
    model, tokenizer, info, config, report = quantized(tiny_lm_dir, "int8")
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "keep").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_quantized(model, tokenizer, info, report, config, tmp_path / "q")
    # --overwrite replaces only an empty directory or an earlier lowbit output, never a user's files
    with pytest.raises(FileExistsError, match="earlier lowbit output"):
        save_quantized(model, tokenizer, info, report, config, tmp_path / "q", overwrite=True)
    assert os.listdir(tmp_path / "q") == ["keep"]
    (tmp_path / "q" / "keep").unlink()
    save_quantized(model, tokenizer, info, report, config, tmp_path / "q", overwrite=True)  # empty: replaced
    save_quantized(model, tokenizer, info, report, config, tmp_path / "q", overwrite=True)  # an earlier output
    assert sorted(os.listdir(tmp_path)) == ["q"]


def test_overwrite_keeps_a_users_file_inside_an_earlier_output(tiny_lm_dir, tmp_path):
    """Issue 25, finding 2: D/notes.txt beside an earlier output, and a directory holding lowbit.json,
    config.json and thesis.tex (an output of a lowbit that did not list its files), are refused in one
    line naming the foreign entries; nothing is deleted."""
    model, tokenizer, info, config, report = quantized(tiny_lm_dir, "int8")
    out = save_quantized(model, tokenizer, info, report, config, tmp_path / "q")
    assert json.loads((out / "lowbit.json").read_text())["files"] == sorted(os.listdir(out))
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    before = sorted(os.listdir(out))
    with pytest.raises(FileExistsError, match=r"holds notes.txt, sub, which lowbit did not write") as err:
        save_quantized(model, tokenizer, info, report, config, out, overwrite=True)
    assert "\n" not in str(err.value) and sorted(os.listdir(out)) == before
    assert sorted(os.listdir(tmp_path)) == ["q"]

    old = tmp_path / "old"
    old.mkdir()
    (old / "lowbit.json").write_text(json.dumps({"lowbit_layout": 1}))
    (old / "config.json").write_text("{}")
    (old / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match=r"holds thesis.tex, which"):
        save_quantized(model, tokenizer, info, report, config, old, overwrite=True)
    assert (old / "thesis.tex").read_text() == "years of work"
    (old / "thesis.tex").unlink()  # an older output of only lowbit's files is replaced
    save_quantized(model, tokenizer, info, report, config, old, overwrite=True)
    assert "files" in json.loads((old / "lowbit.json").read_text())


def test_outputs_keep_the_umasks_permissions(tiny_lm_dir, tmp_path):
    """Issue 25, finding 18: model.safetensors was 0600 (safetensors' temp file) beside 0644 files."""
    model, tokenizer, info, config, report = quantized(tiny_lm_dir, "int8")
    mask = os.umask(0o022)
    try:
        out = save_quantized(model, tokenizer, info, report, config, tmp_path / "q")
        os.umask(0o002)
        out2 = save_quantized(model, tokenizer, info, report, config, tmp_path / "q2")
    finally:
        os.umask(mask)
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {p.name: 0o644 for p in out.iterdir()}
    assert {p.stat().st_mode & 0o777 for p in out2.iterdir()} == {0o664}
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["architectures"] == ["LlamaForCausalLM"]  # finding 8: always written


@pytest.mark.parametrize("where", ["is", "inside", "holds"])
def test_overwrite_never_touches_the_input_model(tiny_lm_dir, tmp_path, where):
    """The input model is a directory here; a GGUF file's directory counts as 'holds' it."""
    import shutil

    victim = tmp_path / "victim"
    shutil.copytree(tiny_lm_dir, victim)
    model, tokenizer, info, config, report = quantized(victim, "int8")
    out = {"is": victim, "inside": victim / "q", "holds": tmp_path}[where]
    before = sorted(os.listdir(victim))
    with pytest.raises(FileExistsError, match="input model"):
        save_quantized(model, tokenizer, info, report, config, out, overwrite=True)
    assert sorted(os.listdir(victim)) == before


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "half").write_text("written")
        raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_corrupt_directory_is_a_load_error(tiny_lm_dir, tmp_path):
    model, tokenizer, info, config, report = quantized(tiny_lm_dir, "int8")
    out = save_quantized(model, tokenizer, info, report, config, tmp_path / "q")
    (out / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ModelLoadError, match="model.safetensors: not a valid safetensors file: its header"):
        load_quantized(out)
    with pytest.raises(ModelLoadError, match="no lowbit.json"):
        load_quantized(tiny_lm_dir)


@pytest.fixture
def saved_int4(tiny_lm_dir, tmp_path):
    model, tokenizer, info, config, report = quantized(tiny_lm_dir, "nf4")
    return save_quantized(model, tokenizer, info, report, config, tmp_path / "q")


def _edit_meta(directory, edit):
    path = directory / "lowbit.json"
    meta = json.loads(path.read_text())
    meta = edit(meta) or meta
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("edit, message", [
    (lambda m: [m], "layout version None"),
    (lambda m: m.pop("quantize") and None, "quantize must be an object"),
    (lambda m: m.update(model={"kind": "causal-lm"}), "model must be an object of kind, source, file_hash and name"),
])
def test_malformed_meta_is_a_load_error(saved_int4, edit, message):
    _edit_meta(saved_int4, edit)
    with pytest.raises(ModelLoadError, match=message):
        load_quantized(saved_int4)


def test_parts_that_do_not_match_the_stated_shape_are_refused(saved_int4):
    """The decoders trust part sizes: a larger stated shape would read past the stored codes."""
    name = "model.layers.0.mlp.down_proj"

    def smaller_blocks(meta):
        meta["layers"][name]["block_size"] //= 2  # twice the scales the file holds

    _edit_meta(saved_int4, smaller_blocks)
    with pytest.raises(ModelLoadError, match=f"{name}: stored parts .* do not match a nf4 tensor of shape"):
        load_quantized(saved_int4)

    def grow(meta):
        meta["layers"][name]["block_size"] *= 2
        meta["layers"][name]["shape"][0] *= 2

    _edit_meta(saved_int4, grow)  # checked against the architecture first, before anything is allocated
    with pytest.raises(ModelLoadError, match=f"layer {name} has shape .* but the architecture's is"):
        load_quantized(saved_int4)


def test_a_loaded_model_refuses_save_pretrained_too(tiny_lm_dir, tmp_path):
    from lowbit.layers import SavePretrainedError

    model, tokenizer, info, config, report = quantized(tiny_lm_dir, "nf4")
    loaded, _, _ = load_quantized(save_quantized(model, tokenizer, info, report, config, tmp_path / "q"))
    with pytest.raises(SavePretrainedError, match="lowbit.io.save_quantized"):
        loaded.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_keep_dtype_rounds_the_model_in_memory_as_saved(tiny_lm_dir, tmp_path):
    model, tokenizer, info, config, report = quantized(tiny_lm_dir, "q4_0")
    out = save_quantized(model, tokenizer, info, report, config, tmp_path / "q", keep_dtype=torch.bfloat16)
    loaded, _, meta = load_quantized(out)
    ids = torch.arange(100, 164)[None]
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, loaded(ids).logits)  # the model in memory is what was saved
    embed = model.model.embed_tokens.weight
    assert torch.equal(embed, embed.bfloat16().float()) and meta["config"]["keep_dtype"] == "bfloat16"
    assert meta["quantize"]["model_bytes_after"] == report.model_bytes_after - embed.numel() * 2 - sum(
        p.numel() * 2 for n, p in model.named_parameters() if "norm" in n)


def test_llm_int8_layers_save_and_reload_with_their_threshold(tiny_lm_dir, tmp_path):
    from lowbit.layers.outlier_linear import Int8OutlierLinear

    model, tokenizer, info, config, report = quantized(tiny_lm_dir, "int8_outlier/0.5")
    out = save_quantized(model, tokenizer, info, report, config, tmp_path / "q")
    loaded, _, meta = load_quantized(out)
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, Int8OutlierLinear)}
    assert len(layers) == 14 and {m.threshold for m in layers.values()} == {0.5}
    assert all(m.name == n for n, m in layers.items())  # run-time errors name the layer
    ids = torch.arange(100, 164)[None]
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert sum(m.float_columns for m in layers.values()) > 0  # 0.5 sends some columns of this model to float
    assert meta["config"]["label"] == "int8_outlier/0.5"
    _edit_meta(out, lambda m: m["layers"]["model.layers.0.mlp.up_proj"].update(outlier_threshold=-2))
    with pytest.raises(ModelLoadError, match="model.layers.0.mlp.up_proj: the outlier threshold"):
        load_quantized(out)
