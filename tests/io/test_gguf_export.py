"""GGUF export: lowbit's bytes under GGUF's names, read back by gguf-py, transformers and llama.cpp."""

import importlib.util

import gguf
import numpy as np
import pytest
import torch

from lowbit import QuantLinear, dispatch, quantize_model
from lowbit.io.gguf_export import ExportError, _permute, export_gguf
from lowbit.models import load_model
from lowbit.planning.plan import QuantPlan

PROMPT = "The capital of France is Paris. The capital of Germany is"


def quantized(plan):
    model, tokenizer, _ = load_model(None)
    quantize_model(model, plan, progress=False)
    return model, tokenizer


def mixed_plan():
    """Every GGUF type: K-quants on the 1536-wide rows, a fallback on the 576-wide ones."""
    return QuantPlan.from_dict({"rules": [
        {"pattern": "layers.0.mlp.down_proj", "format": "q6_k"},
        {"pattern": "layers.1.mlp.down_proj", "format": "q4_k"},
        {"pattern": "layers.0.mlp.gate_proj", "format": "q4_k", "fallback": "q5_1"},
        {"pattern": "up_proj", "format": "q8_0"}, {"pattern": "v_proj", "format": "q5_0"},
        {"pattern": "q_proj", "format": "q4_1"}, {"pattern": "*", "format": "q4_0"}]})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, tokenizer = quantized(mixed_plan())
    path = tmp_path_factory.mktemp("gguf") / "model.gguf"
    counts = export_gguf(model, "smollm2", path)
    return model, tokenizer, path, counts


def test_tensors_are_lowbit_bytes_in_gguf_row_order(exported):
    model, _, path, counts = exported
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    types = {m.qweight.format.name for m in model.modules() if isinstance(m, QuantLinear)}
    assert types == {"q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q6_k"} and sum(counts.values()) == len(tensors)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30)
    cfg = model.config
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        t = tensors[names.get_name(name + ".weight", try_suffixes=(".weight",))]
        assert t.tensor_type.name.lower() == m.qweight.format.name
        rows = m.qweight.parts["data"].reshape(m.qweight.shape[0], -1)
        heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(name.rsplit(".")[-1])
        if heads:
            rows = _permute(rows, heads)
        assert np.array_equal(np.asarray(t.data).reshape(rows.shape), rows.numpy()), name
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert isinstance(model.lm_head, QuantLinear) and tensors["output.weight"].tensor_type.name == "Q4_0"


@pytest.mark.slow  # 25 s (transformers converts the file); the import round trip checks its bytes by default
def test_transformers_reads_it_back_to_the_same_logits(exported):
    from transformers import AutoModelForCausalLM

    model, tokenizer, path, _ = exported
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True,
                                                dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode(), dispatch.use("reference"):  # dequantize-then-matmul, as transformers does
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_import_reads_every_type_back_byte_for_byte(exported):
    from lowbit.io.importers import import_model

    model, _, path, _ = exported
    back = {n: m for n, m in import_model(path).model.named_modules() if isinstance(m, QuantLinear)}
    ours = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert back.keys() == ours.keys()
    for name, m in ours.items():
        q, r = m.qweight, back[name].qweight
        assert (q.format, q.shape, q.block_size) == (r.format, r.shape, r.block_size)
        assert torch.equal(q.parts["data"], r.parts["data"]), name


def test_refusals_write_nothing(tmp_path, tiny_lm_dir):
    model, _ = quantized(QuantPlan.uniform("nf4", include=("layers.0.*",)))
    out = tmp_path / "x.gguf"
    with pytest.raises(ExportError, match=r"q4_0, q4_1.*7 layer\(s\).*model.layers.0.self_attn.q_proj \(nf4\)"):
        export_gguf(model, "smollm2", out)
    model, _ = quantized(QuantPlan.uniform("q4_0+had", include=("layers.0.*",)))
    with pytest.raises(ExportError, match="rotation has no GGUF form"):
        export_gguf(model, "smollm2", out)
    model, _ = quantized(QuantPlan.uniform("q4_0"))
    export_gguf(model, "smollm2", out)
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(out).tensors}  # tied to token_embd, as in the source
    out.unlink()
    with pytest.raises(ExportError, match="not one"):
        export_gguf(model, str(tiny_lm_dir), out)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_runs_it_close_to_lowbit(tmp_path):
    """llama.cpp rounds activations to 8 bits before its quantized dot products (ggml's
    vec_dot_type Q8_0), so its log-probabilities differ from lowbit's exact ones by that much:
    mean KL 0.0022 for q4_0 and 0.0020 for q8_0 on four windows, against 3e-8 for an F32 export
    of the same model (measured), where no rounding happens."""
    from llama_cpp import Llama

    from lowbit.eval.protocol import default_text

    model, tokenizer = quantized(QuantPlan.uniform("q4_0"))
    path = tmp_path / "q4_0.gguf"
    export_gguf(model, "smollm2", path)
    llm = Llama(str(path), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    ids = tokenizer(default_text(), return_tensors="pt").input_ids[0]
    kls = []
    for start in (0, 512):
        window = ids[start : start + 512].tolist()
        llm.reset()
        llm.eval(window)
        theirs = torch.tensor(np.array(llm.scores[: len(window)])).log_softmax(-1)
        with torch.inference_mode():
            ours = model(torch.tensor([window])).logits[0].log_softmax(-1)
        kls.append((ours.exp() * (ours - theirs)).sum(-1).mean())
    assert torch.stack(kls).mean() < 5e-3, kls
