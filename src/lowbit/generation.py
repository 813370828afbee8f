"""Text generation with a (quantized) causal LM: greedy or sampled, token by token.

``generate`` runs one of two steppers. ``LlamaStepper`` is a lean decode loop for Llama-
architecture models (the embedded SmolLM2): the same arithmetic as transformers'
``LlamaForCausalLM`` (tests/test_generation.py checks the logits against it), with a
preallocated KV cache; single tokens go through the one-call native step
(lowbit.kernels.llama_step) where it can run the model. It exists because transformers' own
loop costs about 12 ms per token on this model on 2 cores even when every linear layer
costs nothing (measured by replacing them with a zero-output module), which alone caps
decoding at ~80 tokens/s whatever the kernels do. ``HFStepper`` runs any causal LM through
its own forward with a ``DynamicCache``. A quantized model also works with transformers'
``generate()`` unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import kernels
from . import limits as L
from .errors import InputError

LLAMA_TYPES = ("llama",)  # architectures LlamaStepper reproduces (transformers' modeling_llama.py)


@dataclass
class Generation:
    prompt_ids: list[int]
    new_ids: list[int] = field(default_factory=list)
    text: str = ""
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stepper: str = ""

    @property
    def decode_tokens_per_second(self) -> float:
        """New tokens after the first, over the time they took (the first comes from the prefill)."""
        n = len(self.new_ids) - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return len(self.prompt_ids) / self.prefill_seconds if self.prefill_seconds > 0 else 0.0


class LlamaStepper:
    """Logits of the last position for the next tokens, with the model's KV cache kept here."""

    name = "lowbit llama loop"

    def __init__(self, model, max_len: int):
        cfg = model.config
        self.model, self.max_len = model, max_len
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        inner = model.model
        self.layers = list(inner.layers)
        # a row as the model computes with it: a NarrowEmbedding's table is narrower (lowbit.layers.keep_dtype)
        row = inner.embed_tokens(torch.zeros(1, dtype=torch.long)).detach()  # (1, D)
        dtype = row.dtype
        positions = torch.arange(max_len)[None]
        self.cos, self.sin = inner.rotary_emb(row, positions)  # (1, L, head_dim)
        shape = (len(self.layers), 1, self.kv_heads, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype)
        self.v_cache = torch.zeros(shape, dtype=dtype)
        self.pos = 0
        self.native = None  # the one-call C step for single tokens, where it can run this model
        if kernels.enabled():
            from .kernels.llama_step import NativeStep

            scale = self.layers[0].self_attn.scaling
            self.native = NativeStep.build(model, self.k_cache, self.v_cache, self.cos, self.sin, scale)
        if self.native is not None:
            self.name = "lowbit native step"

    @staticmethod
    def supports(model) -> bool:
        cfg = getattr(model, "config", None)
        return (getattr(cfg, "model_type", None) in LLAMA_TYPES and getattr(cfg, "hidden_act", None) == "silu"
                and hasattr(model, "model") and hasattr(model.model, "rotary_emb"))

    def _norm(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # LlamaRMSNorm's arithmetic (float32 models: its casts are no-ops); torch.rms_norm is
        # no faster here (measured: 47 us a call, composite on CPU)
        return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps))

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: (T,) the next tokens -> (vocab,) logits after the last of them."""
        t, p = ids.shape[0], self.pos
        if p + t > self.max_len:
            raise InputError(f"the KV cache holds {self.max_len} tokens; {p + t} asked")
        if t == 1 and self.native is not None and kernels.enabled():
            logits = self.native(int(ids[0]), p)
            self.pos = p + 1
            return logits
        h = self.model.model.embed_tokens(ids[None])  # (1, T, D)
        cos, sin = self.cos[:, None, p : p + t], self.sin[:, None, p : p + t]  # (1, 1, T, hd)
        mask = None
        if t > 1 and p > 0:  # new tokens see the cache and each other causally
            mask = torch.ones(t, p + t, dtype=torch.bool).tril(p)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = self._norm(h, layer.input_layernorm.weight)
            q = attn.q_proj(x).view(1, t, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(1, t, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            self.k_cache[i, :, :, p : p + t] = k
            self.v_cache[i, :, :, p : p + t] = v
            keys, values = self.k_cache[i, 0, :, : p + t], self.v_cache[i, 0, :, : p + t]  # (KV, p+t, hd)
            if t == 1:  # one query: three small products beat SDPA's kernel launch (66 us here)
                qg = q.view(self.kv_heads, self.heads // self.kv_heads, self.head_dim)  # heads grouped by KV head
                weights = torch.softmax(torch.matmul(qg, keys.transpose(1, 2)) * attn.scaling, dim=-1)
                o = torch.matmul(weights, values).view(1, self.heads, 1, self.head_dim)
            else:
                o = F.scaled_dot_product_attention(q, keys[None], values[None], attn_mask=mask,
                                                   is_causal=p == 0, scale=attn.scaling,
                                                   enable_gqa=self.kv_heads != self.heads)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(1, t, -1))
            mlp = layer.mlp
            x = self._norm(h, layer.post_attention_layernorm.weight)
            h = h + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        self.pos = p + t
        last = self._norm(h[:, -1], self.model.model.norm.weight)
        return self.model.lm_head(last)[0]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)


class HFStepper:
    """Any causal LM, through its own forward and a DynamicCache."""

    name = "transformers forward"

    def __init__(self, model, max_len: int):
        import inspect

        from transformers import DynamicCache

        self.model, self.cache = model, DynamicCache()
        # transformers 5 renames past_key_values to cache (the old name warns, and goes in 5.40)
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids[None], use_cache=True, logits_to_keep=1, **{self.cache_arg: self.cache})
        return out.logits[0, -1]


def stepper_for(model, max_len: int):
    return (LlamaStepper if LlamaStepper.supports(model) else HFStepper)(model, max_len)


def next_token(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None) -> int:
    """Greedy at temperature 0; else a sample from softmax(logits / T) cut to top_k / top_p."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def check_prompt(prompt: str) -> None:
    """A prompt the tokenizer can take: argv bytes that are not UTF-8 arrive as lone surrogates (Python's
    surrogateescape), which tokenizers refuses with a TypeError."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = ord(prompt[e.start]) - 0xDC00 if 0xDC80 <= ord(prompt[e.start]) <= 0xDCFF else None
        what = f"byte 0x{byte:02x}" if byte is not None else f"character U+{ord(prompt[e.start]):04X}"
        raise InputError(f"--prompt is not valid UTF-8 ({what} at character {e.start}): give the prompt as UTF-8 "
                         "text") from None


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, seed: int | None) -> None:
    """The sampling numbers within their ranges (a NaN temperature made torch.multinomial raise, a seed past
    2**64 overflowed torch's)."""
    L.TEMPERATURE.check(temperature, "temperature")
    for r, name, value in ((L.TOP_K, "top_k", top_k), (L.TOP_P, "top_p", top_p), (L.SEED, "seed", seed)):
        if value is not None:
            r.check(value, name)


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             on_text: Callable[[str], None] | None = None, stop_at_eos: bool = True) -> Generation:
    """Generate up to ``max_new_tokens`` after ``prompt``; ``on_text`` gets each new piece of text.
    The numbers' ranges are lowbit.limits' (docs/limits.md), checked before any token is computed."""
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p, seed)
    check_prompt(prompt)
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids[0]
    if prompt_ids.numel() == 0:
        raise InputError("the prompt encodes to no tokens")
    limit = getattr(model.config, "max_position_embeddings", None)
    max_len = prompt_ids.numel() + max_new_tokens
    if limit is not None and max_len > limit:
        raise InputError(f"prompt ({prompt_ids.numel()} tokens) + {max_new_tokens} new tokens exceeds the model's "
                         f"{limit} positions")
    L.MAX_NEW_TOKENS.check(max_new_tokens, "max_new_tokens")  # a model without a stated limit: lowbit's
    step = stepper_for(model, max_len)
    gen = Generation(prompt_ids.tolist(), stepper=step.name)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    eos = set() if not stop_at_eos or tokenizer.eos_token_id is None else {tokenizer.eos_token_id}
    start = time.perf_counter()
    logits = step(prompt_ids)
    gen.prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    shown = ""
    while True:
        token = next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        gen.new_ids.append(token)
        if on_text is not None:  # the whole text again: a token's bytes may end a character begun before
            text = tokenizer.decode(gen.new_ids, skip_special_tokens=True)
            if len(text) > len(shown) and not text.endswith("\ufffd"):  # whole characters only
                on_text(text[len(shown) :])
                shown = text
        if token in eos or len(gen.new_ids) == max_new_tokens:
            break
        logits = step(torch.tensor([token]))
    gen.decode_seconds = time.perf_counter() - start
    gen.text = tokenizer.decode(gen.new_ids, skip_special_tokens=True)
    if on_text is not None and len(gen.text) > len(shown):
        on_text(gen.text[len(shown) :])
    return gen
