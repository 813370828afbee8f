"""lowbit.models.synthetic and scripts/make_checkpoint.py: synthetic Llama checkpoints that transformers and lowbit
load, sharded as save_pretrained shards, the same values whatever the shard size, SmolLM2's weights in tile mode.

The first test to need the embedded SmolLM2's converted cache makes it (~20 s once per session, as the
``smollm2`` fixture does); everything else takes a second or less."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lowbit.errors import InputError
from lowbit.models.synthetic import PRESETS, Shape, config, layout, parse_size, smollm2_dir, tile, write_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TINY = PRESETS["tiny"]
SMALL_SHARDS = 2 * 10**6  # the tiny preset's 3.1 MB embedding and head each get a shard, the layers a third


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            found.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118 (safe_open is no dict)
    return found


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    lines = []
    out = write_checkpoint(tmp_path_factory.mktemp("synthetic") / "tiny", TINY, shard_size=SMALL_SHARDS,
                           progress=lines.append)
    assert len(lines) == 3 and all(" MB in " in line for line in lines), lines
    return out


def test_transformers_loads_it_and_runs_a_forward(sharded):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(sharded)
    tokenizer = AutoTokenizer.from_pretrained(sharded)
    assert model.dtype == torch.bfloat16 and model.config.vocab_size == TINY.vocab
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()  # the tiny preset is untied
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], TINY.vocab) and torch.isfinite(logits).all()


def test_lowbit_loads_it(sharded):
    from lowbit.models import load_model

    model, tokenizer, info = load_model(sharded)
    assert info.kind == "causal-lm" and model.config.num_hidden_layers == TINY.layers
    assert tokenizer.decode(tokenizer("Hello world")["input_ids"]).endswith("Hello world")


def test_index_lists_every_tensor_once_and_matches_the_shard_headers(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    expected = layout(TINY)
    assert sorted(index["weight_map"]) == sorted(expected)
    shards = sorted(sharded.glob("*.safetensors"))
    assert [p.name for p in shards] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    total = 0
    for path in shards:
        with safe_open(path, "pt") as f:
            names = list(f.keys())  # noqa: SIM118
            assert sorted(names) == sorted(n for n, file in index["weight_map"].items() if file == path.name)
            for name in names:
                piece = f.get_slice(name)
                assert tuple(piece.get_shape()) == expected[name] and piece.get_dtype() == "BF16"
                total += 2 * torch.Size(expected[name]).numel()
    assert index["metadata"] == {"total_size": total, "total_parameters": total // 2}


def test_one_shard_is_model_safetensors_without_an_index(tmp_path):
    out = write_checkpoint(tmp_path / "one", TINY)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "chat_template.jinja"])


def test_the_same_seed_gives_the_same_values_whatever_the_shard_size(sharded, tmp_path):
    whole = tensors(write_checkpoint(tmp_path / "whole", TINY))
    split = tensors(sharded)
    assert whole.keys() == split.keys()
    for name in whole:  # bit for bit
        assert torch.equal(whole[name].view(torch.int16), split[name].view(torch.int16)), name
    assert torch.equal(whole["model.norm.weight"], torch.ones(TINY.hidden, dtype=torch.bfloat16))
    weights = whole["model.layers.1.mlp.up_proj.weight"].float()
    assert abs(weights.std().item() - 0.02) < 0.002 and abs(weights.mean().item()) < 0.002
    other = tensors(write_checkpoint(tmp_path / "seed1", TINY, seed=1))
    assert not torch.equal(other["model.layers.1.mlp.up_proj.weight"], whole["model.layers.1.mlp.up_proj.weight"])
    # another dtype rounds the same float32 draws
    fp32 = tensors(write_checkpoint(tmp_path / "fp32", TINY, dtype=torch.float32))
    assert torch.equal(fp32["lm_head.weight"].bfloat16(), whole["lm_head.weight"])


def test_tile_reproduces_smollm2_where_the_shapes_match(tmp_path):
    # SmolLM2's layer shapes; 1000 tokens of its 49,152; an untied head (SmolLM2 ties it to the embedding)
    shape = dataclasses.replace(PRESETS["smollm2"], layers=1, vocab=1000, tied=False)
    written = tensors(write_checkpoint(tmp_path / "tiled", shape, init="tile"))
    with safe_open(smollm2_dir() / "model.safetensors", "pt") as source:
        for name in layout(shape):
            origin = "model.embed_tokens.weight" if name == "lm_head.weight" else name
            expected = source.get_tensor(origin)[: shape.vocab] if "embed" in origin else source.get_tensor(origin)
            assert torch.equal(written[name], expected.bfloat16()), name


def test_tile_wraps_layers_and_crops_to_smaller_shapes(tmp_path):
    shape = Shape(hidden=64, layers=32, mlp=128, heads=2, kv_heads=1, vocab=256, tied=True)
    written = tensors(write_checkpoint(tmp_path / "wrapped", shape, init="tile"))
    with safe_open(smollm2_dir() / "model.safetensors", "pt") as source:
        # SmolLM2 has 30 layers: layer 31 is its layer 1
        q = source.get_tensor("model.layers.1.self_attn.q_proj.weight")
        assert torch.equal(written["model.layers.31.self_attn.q_proj.weight"], q[:64, :64].bfloat16())
        norm = source.get_tensor("model.layers.1.input_layernorm.weight")
        assert torch.equal(written["model.layers.31.input_layernorm.weight"], norm[:64].bfloat16())


def test_tile_repeats_the_source_along_every_dimension():
    source = torch.arange(6.0).view(2, 3)
    out = tile(source, (5, 7))
    rows, cols = torch.meshgrid(torch.arange(5), torch.arange(7), indexing="ij")
    assert torch.equal(out, source[rows % 2, cols % 3])
    assert torch.equal(tile(torch.arange(3.0), (8,)), torch.tensor([0.0, 1, 2, 0, 1, 2, 0, 1]))


def test_the_smollm2_preset_is_the_embedded_models_shape():
    embedded = json.loads((smollm2_dir() / "config.json").read_text())
    preset = PRESETS["smollm2"]
    assert (preset.hidden, preset.layers, preset.mlp, preset.heads, preset.kv_heads, preset.vocab, preset.tied) == (
        embedded["hidden_size"], embedded["num_hidden_layers"], embedded["intermediate_size"],
        embedded["num_attention_heads"], embedded["num_key_value_heads"], embedded["vocab_size"],
        embedded["tie_word_embeddings"])
    assert preset.rope_theta == embedded["rope_parameters"]["rope_theta"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_presets_config_is_one_transformers_reads(name, tmp_path):
    from transformers import AutoConfig

    shape = PRESETS[name]
    (tmp_path / "config.json").write_text(json.dumps(config(shape, torch.bfloat16, {"bos_token_id": 1})))
    read = AutoConfig.from_pretrained(tmp_path)
    assert (read.hidden_size, read.num_hidden_layers, read.intermediate_size, read.num_key_value_heads) == (
        shape.hidden, shape.layers, shape.mlp, shape.kv_heads)
    assert read.tie_word_embeddings == shape.tied
    assert read.rope_parameters["rope_theta"] == shape.rope_theta
    assert read.rope_parameters["rope_type"] == ("llama3" if shape.rope_scaling else "default")


def test_the_8b_preset_has_llama3_8bs_size():
    # a Llama 3 8B's model.safetensors.index.json says "total_size": 16060522496 (bf16, 2 bytes a weight; the
    # Hugging Face Hub docs, "Model repository files", quote it); Llama-3.2-1B: "1.23B" parameters (its model card)
    assert 2 * sum(torch.Size(d).numel() for d in layout(PRESETS["8b"]).values()) == 16_060_522_496
    assert sum(torch.Size(d).numel() for d in layout(PRESETS["1b"]).values()) == 1_235_814_400


@pytest.mark.parametrize(("change", "needle"), [
    ({"hidden": 0}, "hidden must be a positive integer"),
    ({"layers": -1}, "layers must be a positive integer"),
    ({"kv_heads": 0}, "kv-heads must be a positive integer"),
    ({"heads": 5}, "heads (5) must divide hidden (32)"),
    ({"kv_heads": 3}, "kv-heads (3) must divide heads (4)"),
    ({"hidden": 36, "heads": 4, "kv_heads": 1}, "must be even"),
])
def test_impossible_shapes_are_refused(change, needle, tmp_path):
    with pytest.raises(InputError) as err:
        write_checkpoint(tmp_path / "out", dataclasses.replace(TINY, **change))
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_refused_unless_an_empty_directory(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        write_checkpoint(full, TINY)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("mine")
    with pytest.raises(InputError, match="not a directory"):
        write_checkpoint(tmp_path / "file", TINY)
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "link").symlink_to(empty)
    with pytest.raises(FileExistsError, match="symbolic link"):  # the rename would replace the link, not fill empty/
        write_checkpoint(tmp_path / "link", TINY)
    assert (write_checkpoint(empty, TINY) / "model.safetensors").is_file()


@pytest.mark.parametrize("text", ["0", "-1GB", "2XB", "", "GB", "1e9"])
def test_bad_shard_sizes_are_refused(text):
    with pytest.raises(InputError, match="not a positive size"):
        parse_size(text)


def test_shard_sizes_read_as_save_pretrained_reads_them():
    assert [parse_size(t) for t in ("2GB", "500mb", "1.5 MB", "1000", "1TB")] == [
        2 * 10**9, 5 * 10**8, 1_500_000, 1000, 10**12]


def test_unknown_init_and_dtype_are_refused(tmp_path):
    with pytest.raises(InputError, match="unknown init"):
        write_checkpoint(tmp_path / "a", TINY, init="zeros")
    with pytest.raises(InputError, match="unsupported dtype"):
        write_checkpoint(tmp_path / "b", TINY, dtype=torch.int8)


def _script():
    spec = importlib.util.spec_from_file_location("make_checkpoint", ROOT / "scripts" / "make_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_writes_a_line_per_shard(tmp_path, capsys):
    assert _script().main([str(tmp_path / "out"), "--layers", "1", "--shard-size", "2MB", "--seed", "3"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4 and lines[-1].startswith("wrote ")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 1


@pytest.mark.parametrize("argv", [["--heads", "5"], ["--shard-size", "lots"], ["--vocab", "0"]])
def test_the_script_refuses_bad_input_in_one_line(argv, tmp_path, capsys):
    assert _script().main([str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("make_checkpoint.py: error: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_memory_holds_one_shard_not_the_model(tmp_path):
    """A 190 MB checkpoint in 4 MB shards (its 8 MB MLP weights one a shard), in a fresh process: its peak
    resident size grows by a fraction of that (16 MB here; ~50 MB of it before a first write: imports, allocator)."""
    shape = Shape(hidden=1024, layers=6, mlp=4096, heads=8, kv_heads=2, vocab=4096, tied=True)
    total = 2 * sum(torch.Size(d).numel() for d in layout(shape).values())
    smollm2_dir()  # converted here, if not yet: the child only looks it up (a conversion would blur its peak)
    # the peak from just before the write, after a first one: /proc/self/clear_refs "5" resets VmHWM (proc(5))
    code = (
        "import sys\n"
        "from lowbit.models.synthetic import PRESETS, Shape, write_checkpoint\n"
        "write_checkpoint(sys.argv[1] + '-first', PRESETS['tiny'])\n"
        "def status(key):\n"
        "    return next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith(key))\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = status('VmRSS:')\n"
        f"write_checkpoint(sys.argv[1], {shape!r}, shard_size=4 * 10**6)\n"
        "print((status('VmHWM:') - before) * 1024)\n"  # kB
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "big")], capture_output=True, text=True,
                          check=True)
    grown = int(done.stdout.split()[-1])
    print(f"{total / 1e6:.0f} MB written, peak resident size grew {grown / 1e6:.0f} MB")
    assert total > 180e6 and grown < 40e6, (total, grown)
