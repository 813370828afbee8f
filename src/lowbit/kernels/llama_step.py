"""ctypes view of a Llama model for the one-call decode step (llama_step.c).

``NativeStep.build(model, k_cache, v_cache, cos, sin)`` returns None where the step cannot
run the model as its modules would: a layer the fused kernel has no path for (``+had``
rotation, a format without a kernel), a dtype other than float32, weights off the CPU.
The caller then keeps its PyTorch loop.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from ..errors import InputError
from ..layers.keep_dtype import NarrowEmbedding
from ..layers.linear import QuantLinear
from .library import native
from .linear import F32, ISA, Prepared, _made, _Weights, prepare

_P = ctypes.c_void_p
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


class _Layer(ctypes.Structure):
    _fields_ = ([(name, _Weights) for name in PROJECTIONS] + [(f"{name}_bias", _P) for name in PROJECTIONS]
                + [("attn_norm", _P), ("mlp_norm", _P), ("k_cache", _P), ("v_cache", _P)])


class _Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in
                ("n_layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "max_len", "vocab")] + [
        ("eps", ctypes.c_float), ("attn_scale", ctypes.c_float), ("layers", ctypes.POINTER(_Layer)),
        ("final_norm", _P), ("head", _Weights), ("head_bias", _P), ("cos", _P), ("sin", _P), ("scratch", _P)]


native.lowbit_llama_scratch.argtypes = [ctypes.POINTER(_Model)]
native.lowbit_llama_scratch.restype = ctypes.c_int64
native.lowbit_llama_step.argtypes = [ctypes.POINTER(_Model), _P, ctypes.c_int64, _P, ctypes.c_int]
native.lowbit_llama_step.restype = ctypes.c_int


def _weights(module: nn.Module) -> tuple[Prepared, torch.Tensor | None] | None:
    """The kernel's view of a projection and its bias; None where the step cannot run it."""
    if type(module) is QuantLinear:  # a subclass (LLM.int8()'s Int8OutlierLinear) computes its own forward
        if module.signs is not None:  # +had rotates the input first: not in the step
            return None
        p = prepare(module.qweight)
    elif type(module) is nn.Linear and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu":
        w = module.weight.detach().contiguous()
        p = _made(F32, w.shape[0], w.shape[1], 1, w, None, None, None, 0.0)
    else:
        return None
    bias = getattr(module, "bias", None)
    if p is None or bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"):
        return None
    return p, None if bias is None else bias.detach().contiguous()


class NativeStep:
    """Holds the structures and every tensor their pointers name."""

    def __init__(self, model_struct: _Model, layers, keep: list, embed: torch.Tensor, vocab: int):
        self.model, self.layers, self.keep, self.embed, self.vocab = model_struct, layers, keep, embed, vocab
        self.ref = ctypes.pointer(model_struct)

    @classmethod
    def build(cls, model, k_cache: torch.Tensor, v_cache: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              scale: float) -> NativeStep | None:
        cfg, inner = model.config, model.model
        embed = inner.embed_tokens.weight.detach()
        # an embedding kept narrow (--keep-dtype) gives its rows as float32: the step casts the one it reads
        narrow = isinstance(inner.embed_tokens, NarrowEmbedding) and inner.embed_tokens.compute_dtype == torch.float32
        if (embed.dtype != torch.float32 and not narrow) or embed.device.type != "cpu":
            return None
        keep: list = [k_cache, v_cache]
        layers = (_Layer * len(inner.layers))()
        for i, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            mods = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            for name, module in zip(PROJECTIONS, mods, strict=True):
                got = _weights(module)
                if got is None:
                    return None
                p, bias = got
                setattr(layers[i], name, p.weights)
                setattr(layers[i], f"{name}_bias", None if bias is None else bias.data_ptr())
                keep += [p, bias]
            norms = (layer.input_layernorm.weight.detach().contiguous(),
                     layer.post_attention_layernorm.weight.detach().contiguous())
            keep += norms
            layers[i].attn_norm, layers[i].mlp_norm = norms[0].data_ptr(), norms[1].data_ptr()
            layers[i].k_cache, layers[i].v_cache = k_cache[i].data_ptr(), v_cache[i].data_ptr()
        head = _weights(model.lm_head)
        if head is None:
            return None
        final = inner.norm.weight.detach().contiguous()
        cos, sin = cos.reshape(-1, cos.shape[-1]).contiguous(), sin.reshape(-1, sin.shape[-1]).contiguous()
        keep += [head, final, cos, sin]
        heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
        head_dim = cos.shape[-1]
        m = _Model(len(inner.layers), cfg.hidden_size, heads, kv, head_dim, cfg.intermediate_size, cos.shape[0],
                   head[0].weights.out_features, cfg.rms_norm_eps, scale, layers, final.data_ptr(), head[0].weights,
                   None if head[1] is None else head[1].data_ptr(), cos.data_ptr(), sin.data_ptr(), None)
        scratch = torch.empty(native.lowbit_llama_scratch(ctypes.byref(m)), dtype=torch.float32)
        m.scratch = scratch.data_ptr()
        keep.append(scratch)
        return cls(m, layers, keep, embed, m.vocab)

    def __call__(self, token: int, pos: int) -> torch.Tensor:
        logits = torch.empty(self.vocab, dtype=torch.float32)
        row = self.embed[token].float()
        if native.lowbit_llama_step(self.ref, row.data_ptr(), pos, logits.data_ptr(), ISA):
            raise InputError(f"position {pos} is outside the KV cache ({self.model.max_len} tokens)")
        return logits
