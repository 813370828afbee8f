"""compare of a model built on the meta device (read, quantized and scored one block at a time: lowbit.eval.streamed)
gives the rows compare gives for the model in memory, to the bit; the model is left as it was; a row that fails
mid-run says why and the next is scored."""

import torch

from lowbit.errors import LayerQuantizeError
from lowbit.eval.reference import Reference
from lowbit.evaluate import compare
from lowbit.models import load_model
from lowbit.models.lazy import load_lazily
from lowbit.models.synthetic import PRESETS, write_checkpoint
from lowbit.planning import QuantPlan

PROTOCOL = {"window": 64, "windows": 2}
TIMES = ("quantize_seconds", "eval_seconds")  # what may differ between two runs
# every way a plan without calibration makes its layers: packed formats, double quant, a scale search, a
# rotation, a GGUF block type, LLM.int8()'s own layer (its float-path share summed over the blocks)
LABELS = ("nf4", "nf4+dq", "q4_0", "int4_asym/64@hqq", "nf4@mse", "nf4+had", "int8_outlier")


def both(directory, plans, cache, monkeypatch, **kwargs) -> tuple[dict, dict]:
    """compare's report for the model loaded whole and for it on the meta device, each with a reference cache of
    its own (so each computes its reference its own way)."""
    reports = []
    for name, lazy in (("whole", False), ("lazy", True)):
        monkeypatch.setenv("LOWBIT_CACHE", str(cache / name))
        if lazy:
            model, tokenizer, info, weights = load_lazily(str(directory))
            assert weights is not None
        else:
            (model, tokenizer, info), weights = load_model(str(directory)), None
        reports.append(compare(model, tokenizer, info, plans, progress=False, weights=weights, **PROTOCOL, **kwargs))
        if lazy:
            assert all(p.is_meta for p in model.parameters()), "what was read is put back"
            assert all(type(m).__name__ == "Linear" for n, m in model.named_modules() if n.endswith("proj"))
    return tuple(reports)


def assert_same_rows(whole: dict, lazy: dict) -> None:
    assert whole["reference"] == lazy["reference"] and whole["protocol"] == lazy["protocol"]
    assert [r["format"] for r in whole["results"]] == [r["format"] for r in lazy["results"]]
    for a, b in zip(whole["results"], lazy["results"], strict=True):
        assert list(a) == list(b), a["format"]  # the same columns, in the same order
        assert {k: v for k, v in a.items() if k not in TIMES} == {k: v for k, v in b.items() if k not in TIMES}


def assert_same_reference(cache) -> None:
    (whole,), (lazy,) = ([p for p in (cache / name).iterdir() if p.name.startswith("ref-causal")]
                         for name in ("whole", "lazy"))
    a, b = Reference.open(whole), Reference.open(lazy)
    for i in range(len(a.ids)):
        assert torch.equal(a._file.read_row("logprobs", i, torch.empty(a._file.shape("logprobs")[1:])),
                           b._file.read_row("logprobs", i, torch.empty(b._file.shape("logprobs")[1:])))
    assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("nll", "top1", "lse"))


def test_rows_of_every_kind_of_plan(tiny_lm_dir, tmp_path, monkeypatch):
    whole, lazy = both(tiny_lm_dir, [QuantPlan.uniform(label) for label in LABELS], tmp_path, monkeypatch)
    assert_same_reference(tmp_path)
    assert_same_rows(whole, lazy)
    by = {r["format"]: r for r in lazy["results"]}
    assert by["int8_outlier"]["float_path_share"] >= 0 and len(by["nf4"]["layer_sqnr"]["layers"]) == 2 * 7


def test_rows_with_a_quantized_tied_head_and_keep_dtype(tiny_lm_dir, tmp_path, monkeypatch):
    """The tied head quantized (from the embedding, outside the blocks) and the float tensors kept in bfloat16:
    the keep row, and each row's tensors rounded as compare rounds the model in memory."""
    plans = [QuantPlan.uniform("q8_0", exclude=()), QuantPlan.uniform("nf4")]
    whole, lazy = both(tiny_lm_dir, plans, tmp_path, monkeypatch, keep_dtype=torch.bfloat16)
    assert [r["format"] for r in lazy["results"]] == ["keep bf16", "q8_0", "nf4"]
    assert lazy["results"][1]["layer_sqnr"]["layers"][-1] == "lm_head"
    assert_same_rows(whole, lazy)


def test_an_untied_bfloat16_checkpoint(tmp_path, monkeypatch):
    """make_checkpoint's tiny shape (bf16 shards, an untied head like Llama 3 8B's), its head quantized too."""
    directory = write_checkpoint(tmp_path / "ck", PRESETS["tiny"])
    plans = [QuantPlan.uniform("q4_0", exclude=()), QuantPlan.uniform("int8")]
    whole, lazy = both(directory, plans, tmp_path / "cache", monkeypatch, keep_dtype=torch.bfloat16)
    assert_same_reference(tmp_path / "cache")
    assert_same_rows(whole, lazy)


def test_a_row_failing_mid_run_says_why_and_the_next_is_scored(tiny_lm_dir, monkeypatch):
    """A value the format cannot hold shows only when a block's layer is rounded: that row is an error, the
    block's copy is dropped, and the next row reads the model as it was."""
    import lowbit.eval.streamed as streamed

    real, calls = streamed.quantize_model, []

    def second_block_fails(model, plan, **kwargs):
        calls.append(kwargs["only"])
        if plan.label == "nf4" and kwargs["only"][0].startswith("model.layers.1."):
            raise LayerQuantizeError("layer 'model.layers.1.self_attn.q_proj' (weight 64x64): out of range")
        return real(model, plan, **kwargs)

    monkeypatch.setattr(streamed, "quantize_model", second_block_fails)
    model, tokenizer, info, weights = load_lazily(str(tiny_lm_dir))
    report = compare(model, tokenizer, info, [QuantPlan.uniform("nf4"), QuantPlan.uniform("int8")], progress=False,
                     weights=weights, **PROTOCOL)
    failed, scored = report["results"]
    assert "out of range" in failed["error"] and scored["kl_mean"] > 0
    assert all(p.is_meta for p in model.parameters())


def test_rows_of_plans_that_calibrate(tiny_lm_dir, tmp_path, monkeypatch):
    """Each quantized into a temporary directory, block by block, then scored as saved: the rows of the model in
    memory (which shares one importance pass among them), SQNR against +awq's folded weights included."""
    labels = ("nf4@amse", "nf4/32+dq+awq+gptq@amse", "int4+had+gptq")
    whole, lazy = both(tiny_lm_dir, [QuantPlan.uniform(label) for label in labels], tmp_path, monkeypatch,
                       keep_dtype=torch.bfloat16, calibrate=4)
    assert [r["format"] for r in lazy["results"]] == ["keep bf16", *labels]
    assert all(r["kl_mean"] > 0 for r in lazy["results"][1:])
    assert_same_rows(whole, lazy)


def test_an_encoder_read_lazily_is_scored_whole(minilm, tmp_path, monkeypatch):
    """all-MiniLM-L6-v2 on the meta device: read in whole first (the encoder protocol runs the model whole)."""
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"Paragraph {i} says something long enough to count as a sentence here." for i in
                                range(4)))
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    model, tokenizer, info, weights = load_lazily("minilm")
    (lazy,) = compare(model, tokenizer, info, [QuantPlan.uniform("nf4")], text=text, progress=False,
                      weights=weights)["results"]
    assert not any(p.is_meta for p in model.parameters())
    model, tokenizer, info = minilm
    (whole,) = compare(model, tokenizer, info, [QuantPlan.uniform("nf4")], text=text, progress=False)["results"]
    assert {k: v for k, v in lazy.items() if k not in TIMES} == {k: v for k, v in whole.items() if k not in TIMES}
