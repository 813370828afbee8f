"""lowbit.generation: the lean and native decode steps give transformers' logits."""

import copy

import pytest
import torch

from lowbit import QuantConfig, QuantLinear, dispatch, kernels, quantize_model
from lowbit.generation import HFStepper, LlamaStepper, generate, next_token
from lowbit.planning import QuantPlan

PROMPT = "The capital of France is"


def hf_logits(model, ids):
    with torch.inference_mode():
        return model(ids[None]).logits[0, -1]


def check_steps(model, tokenizer, steps=6):
    """Prefill, then single tokens: each stepper's logits against a full forward of the sequence."""
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids[0]
    step = LlamaStepper(model, ids.numel() + steps)
    logits = step(ids)
    for _ in range(steps):
        ref = hf_logits(model, ids)
        assert (logits - ref).abs().max() <= 1e-4 * ref.abs().max(), (logits - ref).abs().max()
        assert int(logits.argmax()) == int(ref.argmax())
        ids = torch.cat([ids, logits.argmax().reshape(1)])
        logits = step(ids[-1:])
    return step


def test_llama_stepper_matches_transformers(smollm2):
    model, tokenizer = smollm2[:2]
    step = check_steps(model, tokenizer)
    assert step.native is not None or not kernels.enabled()


def test_native_step_on_a_quantized_model_with_a_quantized_head(smollm2):
    model, tokenizer = smollm2[:2]
    q = copy.deepcopy(model)
    q.lm_head = torch.nn.Linear(576, q.lm_head.out_features, bias=False)
    q.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    quantize_model(q, QuantPlan.uniform(QuantConfig("q4_0"), exclude=()), progress=False)
    assert isinstance(q.lm_head, QuantLinear)
    check_steps(q, tokenizer)


def test_pytorch_loop_when_the_native_step_is_off(smollm2):
    model, tokenizer = smollm2[:2]
    with dispatch.use("reference"):
        step = check_steps(model, tokenizer, steps=2)
    assert step.native is None  # the reference preference keeps the PyTorch loop


def test_generate_greedy_equals_transformers_generate(smollm2):
    model, tokenizer = smollm2[:2]
    pieces = []
    gen = generate(model, tokenizer, PROMPT, 12, on_text=pieces.append)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    assert gen.new_ids == ref[: len(gen.new_ids)]
    assert "".join(pieces) == gen.text and "Paris" in gen.text
    assert gen.prefill_tokens_per_second > 0 and gen.decode_tokens_per_second > 0


def test_any_causal_lm_through_its_forward(tiny_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids[0]
    step = HFStepper(model, 64)
    assert torch.allclose(step(ids), hf_logits(model, ids), atol=1e-5)


def test_sampling_is_seeded_and_respects_top_k():
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    g = torch.Generator().manual_seed(0)
    draws = {next_token(logits, temperature=1.0, top_k=2, generator=g) for _ in range(200)}
    assert draws == {1, 2}
    assert next_token(logits) == 1
    a = [next_token(logits, temperature=2.0, generator=torch.Generator().manual_seed(7)) for _ in range(3)]
    b = [next_token(logits, temperature=2.0, generator=torch.Generator().manual_seed(7)) for _ in range(3)]
    assert a == b
    top_p = {next_token(logits, temperature=1.0, top_p=0.5, generator=g) for _ in range(100)}
    assert top_p == {1}


def test_bad_requests(smollm2):
    model, tokenizer = smollm2[:2]
    with pytest.raises(ValueError, match="at least 1"):
        generate(model, tokenizer, PROMPT, 0)
    with pytest.raises(ValueError, match="positions"):
        generate(model, tokenizer, PROMPT, 10**6)


def test_rotated_layers_keep_the_pytorch_loop(tiny_lm_dir):
    """+had rotates each input first, which the native step does not: the PyTorch loop runs them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    quantize_model(model, QuantPlan.uniform(QuantConfig.parse("int4+had")), progress=False)
    ids = torch.arange(100, 120)
    step = LlamaStepper(model, 32)
    assert step.native is None and step.name == "lowbit llama loop"
    logits = step(ids)
    ref = hf_logits(model, ids)
    assert (logits - ref).abs().max() <= 1e-4 * ref.abs().max()
    nxt = step(logits.argmax().reshape(1))
    assert (nxt - hf_logits(model, torch.cat([ids, logits.argmax().reshape(1)]))).abs().max() <= 1e-4 * ref.abs().max()
