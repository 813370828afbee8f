"""bitsandbytes' 4-bit layout: lowbit's export loaded by transformers with bitsandbytes on the CPU,
a checkpoint bitsandbytes itself wrote read by lowbit, and both round trips byte for byte."""

import copy
import json

import bitsandbytes.functional as F
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from lowbit import QuantConfig, QuantLinear, quantize_model
from lowbit.errors import LowbitWarning, ModelLoadError
from lowbit.io.bnb_checkpoint import STATE_KEY, export_bnb, quant_state
from lowbit.io.gguf_export import ExportError
from lowbit.io.importers import import_model
from lowbit.models import load_model
from lowbit.planning.plan import QuantPlan
from lowbit.quantize import quantize

PROMPT = "The capital of France is Paris. The capital of Germany is"


def layers(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def bnb_layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}


_dequantize_4bit = F.dequantize_4bit  # bitsandbytes' own: float_logits patches the name in F


def dequantize_flat(A: torch.Tensor, quant_state, *args, **kwargs) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit called on the weight as one row, then reshaped.

    bitsandbytes blocks the flattened weight (quantize_4bit, its CUDA kernels), but on a CPU with
    AVX-512 its native dequantize kernel (0.50.2, csrc/cpu_ops.cpp dequantizeBlockwise4bitCpu) takes
    absmax[row * (n / blocksize) + col / blocksize], restarting the blocks on every row: a layer
    whose rows do not hold whole blocks (SmolLM2's 576-wide gate/up in blocks of 256) comes out with
    other scales than were written, a checkpoint bitsandbytes wrote as much as lowbit's (see
    src/lowbit/io/bnb_checkpoint.py). One row has no such boundary; CPUs without AVX-512 and CUDA
    give the same values either way."""
    flat = copy.copy(quant_state)
    flat.shape = torch.Size([quant_state.shape.numel()])
    return _dequantize_4bit(A, flat, *args, **kwargs).reshape(quant_state.shape)


def float_logits(model, ids: torch.Tensor, monkeypatch) -> torch.Tensor:
    """Logits of a transformers bitsandbytes model from its dequantized weights (transformers'
    dequantize(), which replaces the model's 4-bit layers, each read by dequantize_flat), in float32.
    Its own forward on a CPU with AVX512-BF16 repacks each layer to bfloat16 scales and activations
    (bitsandbytes 0.50.2 nn/modules.py Linear4bit.forward): ~4e-3 off, and a RuntimeError for rows
    that do not hold whole blocks; elsewhere it dequantizes with the per-row kernel above."""
    monkeypatch.setattr(F, "dequantize_4bit", dequantize_flat)
    model.dequantize(dtype=torch.float32)  # not config.dtype, a string once save_pretrained has run
    assert not bnb_layers(model)
    with torch.inference_mode():
        return model(ids).logits


@pytest.mark.parametrize(("fmt", "block", "dq", "dtype"), [("nf4", 64, True, torch.float32),
                                                           ("bnb_fp4", 128, False, torch.bfloat16),
                                                           ("nf4", 256, False, torch.float16)])
def test_quant_state_equals_bitsandbytes(fmt, block, dq, dtype):
    """Every tensor, the packed JSON included, equals QuantState.as_dict(packed=True)'s, on a shape
    whose rows do not hold whole blocks (576 wide, as SmolLM2's)."""
    w = torch.randn(96, 576, generator=torch.Generator().manual_seed(block)).to(dtype)
    packed, state = F.quantize_4bit(w, blocksize=block, quant_type="nf4" if fmt == "nf4" else "fp4",
                                    compress_statistics=dq)
    theirs = {"w": packed} | {f"w.{k}": v for k, v in state.as_dict(packed=True).items()}
    ours = quant_state("w", quantize(w, fmt, block_size=block, double_quant=dq))
    assert ours.keys() == theirs.keys()
    for key, t in theirs.items():
        assert ours[key].dtype == t.dtype and torch.equal(ours[key], t), key
    assert any(STATE_KEY in k for k in ours)


@pytest.fixture(scope="module")
def exported(smollm2, tmp_path_factory):
    """SmolLM2 in nf4+dq (block 64, the output head too) and bnb_fp4/256 (blocks across rows), one layer
    left in float32, written in bitsandbytes' layout."""
    model, tokenizer, info, _ = smollm2
    import copy

    model = copy.deepcopy(model)
    plan = QuantPlan.from_dict({"rules": [{"pattern": "layers.29.*", "keep": True},
                                          {"pattern": "mlp.*", "format": "bnb_fp4/256"},
                                          {"pattern": "*", "format": "nf4+dq"}]})  # the head too: untied
    quantize_model(model, plan, progress=False)
    out = tmp_path_factory.mktemp("bnb") / "model"
    # gate_proj and up_proj are 576 wide: blocks of 256 cross their rows (see dequantize_flat)
    with pytest.warns(LowbitWarning, match=r"^58 layer\(s\) have rows that do not hold whole blocks: "
                                           r"model.layers.0.mlp.gate_proj \(576 wide, blocks of 256\), "):
        counts = export_bnb(model, tokenizer, out)
    return model, tokenizer, out, counts


def test_transformers_loads_it_with_the_same_weights_and_logits(exported, monkeypatch):
    model, tokenizer, out, counts = exported
    assert counts == {"nf4": 4 * 29 + 1, "fp4": 3 * 29, "float": 7}
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    assert len(config["quantization_config"]["llm_int8_skip_modules"]) == 7 and not config["tie_word_embeddings"]
    theirs = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float32).eval()
    found = bnb_layers(theirs)
    assert found.keys() == layers(model).keys()
    for name, m in found.items():
        q = model.get_submodule(name).qweight
        state = m.weight.quant_state  # what transformers loaded: lowbit's parts, unchanged
        assert torch.equal(m.weight.data.reshape(-1), q.parts["codes"]), name
        assert (state.quant_type, state.blocksize, state.shape, state.dtype, state.nested) == \
            (q.format.bnb_quant_type, q.block_size, q.shape, q.dtype, q.double_quant), name
        assert torch.equal(state.absmax, q.parts["scales_q" if q.double_quant else "scales"]), name
        if q.double_quant:
            assert torch.equal(state.state2.absmax, q.parts["scales_absmax"]), name
            assert state.offset.item() == q.parts["scales_offset"].item(), name
        assert torch.equal(dequantize_flat(m.weight.data, state), q.dequantize()), name
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        a = model(ids).logits
    b = float_logits(theirs, ids, monkeypatch)
    # Same weights; lowbit's fused kernel and torch's matmul add in different orders: float32 rounding.
    assert (a - b).abs().max() < 1e-4 * a.abs().max(), (a - b).abs().max()
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_round_trip_keeps_every_byte(exported):
    model, _, out, _ = exported
    back = import_model(out).model
    ours, theirs = layers(model), layers(back)
    assert ours.keys() == theirs.keys()
    for name, m in ours.items():
        q, r = m.qweight, theirs[name].qweight
        assert (q.format, q.shape, q.block_size, q.double_quant) == (r.format, r.shape, r.block_size, r.double_quant)
        assert q.parts.keys() == r.parts.keys() and all(torch.equal(q.parts[p], r.parts[p]) for p in q.parts), name
    for key, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], t), key


def test_reads_a_checkpoint_bitsandbytes_wrote(tiny_lm_dir, tmp_path, monkeypatch):
    quantized = AutoModelForCausalLM.from_pretrained(
        tiny_lm_dir, device_map="cpu", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32))
    quantized.save_pretrained(tmp_path / "bnb")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_lm_dir).save_pretrained(tmp_path / "bnb")
    got = import_model(tmp_path / "bnb")
    ours = layers(got.model)
    assert ours.keys() == bnb_layers(quantized).keys() and len(ours) == 14
    for name, m in bnb_layers(quantized).items():
        q = ours[name].qweight
        assert q.format.name == "nf4" and q.double_quant and q.block_size == 64
        assert torch.equal(q.parts["codes"], m.weight.data.reshape(-1))
        assert torch.equal(q.parts["scales_q"], m.weight.quant_state.absmax)
        assert torch.equal(q.dequantize(), dequantize_flat(m.weight.data, m.weight.quant_state)), name
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.inference_mode():
        a = got.model(ids).logits
    b = float_logits(quantized, ids, monkeypatch)
    assert (a - b).abs().max() < 1e-4 * a.abs().max()
    same = [quantize(torch.zeros(q.qweight.shape), "nf4", double_quant=True) for q in ours.values()]
    assert got.report.layer_bytes_after == sum(q.nbytes for q in same)  # bytes counted as lowbit's own nf4+dq


def test_layers_bitsandbytes_cannot_hold_are_named_and_nothing_is_written(smollm2, tmp_path):
    import copy

    model, tokenizer = copy.deepcopy(smollm2[0]), smollm2[1]
    plan = QuantPlan.from_dict({"rules": [{"pattern": "layers.3.mlp.*", "format": "q8_0"},
                                          {"pattern": "layers.4.*_proj", "format": "nf4/48"},
                                          {"pattern": "layers.5.self_attn.*", "format": "nf4+had"},
                                          {"pattern": "*", "format": "nf4"}]})
    quantize_model(model, plan, progress=False)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"nf4, bnb_fp4; 14 layer\(s\).*layers.3.mlp.gate_proj \(q8_0\)"
                                          r".* and 10 more"):
        export_bnb(model, tokenizer, out)
    model, _ = copy.deepcopy(smollm2[0]), None
    plan = QuantPlan.uniform(QuantConfig("nf4", block_size=48), include=("layers.4.mlp.up_proj",))
    quantize_model(model, plan, progress=False)
    with pytest.raises(ExportError, match=r"model.layers.4.mlp.up_proj \(nf4/48: bitsandbytes blocks are 32, 64"):
        export_bnb(model, tokenizer, out)
    with pytest.raises(ExportError, match="no 4-bit layer"):
        export_bnb(copy.deepcopy(smollm2[0]), tokenizer, out)
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_lowbit_cannot_read_is_refused(tiny_lm_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="no bitsandbytes 4-bit quantization_config"):
        import_model(tiny_lm_dir)
    model, tokenizer, _ = load_model(str(tiny_lm_dir))
    quantize_model(model, QuantPlan.uniform(QuantConfig("nf4")), progress=False)
    export_bnb(model, tokenizer, tmp_path / "bnb")
    path = tmp_path / "bnb" / "model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    key = "model.layers.0.mlp.up_proj.weight.quant_map"
    tensors[key] = tensors[key].flip(0)
    save_file(tensors, path)
    with pytest.raises(ModelLoadError, match="up_proj.weight is not a bitsandbytes 4-bit layer lowbit reads: its "
                                             "quant_map is not bitsandbytes' nf4 table"):
        import_model(tmp_path / "bnb")


@pytest.fixture(scope="module")
def tiny_bnb(tiny_lm_dir, tmp_path_factory):
    """tiny_lm_dir in nf4+dq (blocks of 64), written in bitsandbytes' layout."""
    model, tokenizer, _ = load_model(str(tiny_lm_dir))
    quantize_model(model, QuantPlan.uniform(QuantConfig("nf4", double_quant=True)), progress=False)
    out = tmp_path_factory.mktemp("tiny-bnb") / "bnb"
    export_bnb(model, tokenizer, out)
    return out


LAYER = "model.layers.0.mlp.up_proj.weight"  # 128 x 64


@pytest.mark.parametrize("edit,message", [
    ({"dtype": "bogus"}, "quant_state dtype 'bogus' (lowbit reads float32, float16, bfloat16)"),  # was AttributeError
    ({"shape": [-128, 64]}, "quant_state shape [-128, 64]"),  # was RuntimeError
    ({"shape": [10**6, 10**6]}, "cannot hold a nf4 tensor of shape (1000000, 1000000)"),  # nothing of that size made
    ({"shape": [64, 128]}, "is (64, 128) in the file and (128, 64) in the architecture"),
    ({"shape": "128x64"}, "quant_state shape '128x64'"),
    ({"blocksize": 3}, "quant_state blocksize 3"),
    ({"blocksize": True}, "quant_state blocksize True"),
    ({"quant_type": "fp4"}, "quant_type 'fp4' differs from its key's 'nf4'"),
    ({"quant_type": ["nf4"]}, "quant_type ['nf4']"),
    ({"nested_offset": "x"}, "its double quant is not bitsandbytes'"),
    ({"nested_dtype": "float16"}, "its double quant is not bitsandbytes'"),
    ({"compress": True}, "has unknown field(s) compress"),
    ({"nested_offset": None}, "lacks field(s) nested_offset"),
])
def test_an_edited_quant_state_is_one_line_naming_the_field(tiny_bnb, tmp_path, edit, message):
    """Issue 25, findings 11 and 14: every field of a layer's quant_state is checked."""
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_bnb, bad)
    tensors = load_file(bad / "model.safetensors")
    key = f"{LAYER}.{STATE_KEY}nf4"
    info = json.loads(bytes(tensors[key].numpy()).decode())
    info |= edit
    info = {k: v for k, v in info.items() if v is not None}
    tensors[key] = torch.frombuffer(bytearray(json.dumps(info).encode()), dtype=torch.uint8)
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(ModelLoadError) as err:
        import_model(bad)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_edited_state_tensors_are_refused(tiny_bnb, tmp_path):
    """A double-quantized layer missing its nested absmax, and one with a tensor bitsandbytes never writes."""
    import shutil

    from safetensors.torch import load_file, save_file

    for edit, message in [(lambda t: t.pop(f"{LAYER}.nested_absmax"), f"no {LAYER}.nested_absmax"),
                          (lambda t: t.update({f"{LAYER}.extra": torch.zeros(1)}), f"{LAYER}.extra is unexpected"),
                          (lambda t: t.update({f"{LAYER}.absmax": t[f"{LAYER}.absmax"][:-1].clone()}),
                           "stored parts")]:
        bad = tmp_path / "bad"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(tiny_bnb, bad)
        tensors = load_file(bad / "model.safetensors")
        edit(tensors)
        save_file(tensors, bad / "model.safetensors")
        with pytest.raises(ModelLoadError, match="is not a bitsandbytes 4-bit layer lowbit reads") as err:
            import_model(bad)
        assert message in str(err.value) and "\n" not in str(err.value)


def test_import_of_a_bogus_dtype_is_one_line_and_writes_nothing(tiny_bnb, tmp_path):
    import shutil
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_bnb, bad)
    tensors = load_file(bad / "model.safetensors")
    key = f"{LAYER}.{STATE_KEY}nf4"
    info = json.loads(bytes(tensors[key].numpy()).decode()) | {"dtype": "bogus"}
    tensors[key] = torch.frombuffer(bytearray(json.dumps(info).encode()), dtype=torch.uint8)
    save_file(tensors, bad / "model.safetensors")
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", "import", str(bad), "-o", str(tmp_path / "out")],
                       capture_output=True, text=True)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "Traceback" not in r.stderr and last.startswith("lowbit import: error:"), r.stderr
    assert "quant_state dtype 'bogus'" in last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_bnb_export_keeps_the_umasks_permissions(tiny_bnb):
    """Issue 25, finding 18 (the test runs under the default umask, 022 here)."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    assert {p.stat().st_mode & 0o777 for p in tiny_bnb.iterdir()} == {0o666 & ~mask}
