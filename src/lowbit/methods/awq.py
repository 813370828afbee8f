"""Activation-aware input-channel scaling (``+awq``; Lin et al., "AWQ", arXiv 2306.00978), folded into the op
that produces the layers' input, so it costs nothing at run time.

``W x = (W diag(s)) (x / s)``: a channel ``j`` whose activations are large is where the layer's output is most
sensitive to the weights' rounding error, so scaling its weight column up by ``s_j`` (and the input down by the
same) rounds those weights relatively finer. The input's division by ``s`` is folded into whatever makes the
input, exactly: the RMSNorm's weight before ``q/k/v_proj`` and before ``gate/up_proj`` in a pre-norm block,
``up_proj``'s rows before ``down_proj`` (``act(gate) * up`` is linear in ``up``), ``v_proj``'s rows before
``o_proj`` when their widths match (attention mixes tokens, never channels). A post-norm block (BERT) adds its
LayerNorm's output to the residual stream too, so only its ``value -> attention.output.dense`` pair can be
folded there. The layers sharing an input share one ``s``.

``s = a^alpha / sqrt(max(a^alpha) min(a^alpha))`` with ``a`` the calibration mean ``|x_j|`` per channel and
``alpha`` the best of a grid of 20 in [0, 1), as the reference code searches (github.com/mit-han-lab/llm-awq,
``awq/quantize/auto_scale.py``: ``n_grid = 20``, ``x_max ** ratio``, ``scales / sqrt(max * min)``). The
reference scores a ratio by the MSE of the whole attention or MLP module's output; here by the sum over the
group's layers of their output error ``tr(dW H dW^T)`` (``H = 2/n X^T X``, GPTQ's Hessian, so each layer's own
output, which needs no attention rerun), with each layer rounded as its config says but without a scale search
(the reference rounds plainly too). ``alpha = 0`` is ``s = 1``, so no group ends worse on that measure.
Blocks are run one by one on the calibration windows, each on what the scaled block before it gives (scaling is
exact in full precision, so the outputs caught before the fold are passed on), and each fold is checked on the
first window: the block's output must not change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..calibration.carry import carried_stream, resumed_stream
from ..calibration.engine import Block, BlockPass, Consumer, first, transformer_blocks
from ..calibration.statistics import ABS_MEAN, HESSIAN32
from ..errors import InputError
from ..layers.surgery import plan_layers, rounded_layer
from ..planning.config import AWQ_ATTRIBUTE, QuantConfig
from ..planning.plan import QuantPlan
from ..progress import note
from .gptq_model import effective_weight
from .registry import NOTHING, method_for

GRID = 20  # ratios 0, 1/20, ..., 19/20 (llm-awq auto_scale.py, n_grid = 20)
FLOOR = 1e-4  # smallest scale before normalising (llm-awq auto_scale.py: scales.clamp(min=1e-4))
FOLD_RTOL = 1e-3  # a fold is exact up to float32 rounding; a block whose output moves more was folded wrongly


@dataclass(frozen=True)
class Group:
    """Layers reading one input, and the module that makes it (a norm, or a linear layer whose rows feed it)."""

    before: nn.Module
    layers: tuple[nn.Linear, ...]


def scale_groups(block: nn.Module) -> list[Group]:
    """The foldable groups of one transformer block, in the order its forward reaches them."""
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    if attn is not None and mlp is not None and hasattr(block, "input_layernorm"):  # Llama, Mistral, Qwen2
        if "Gemma" in type(block.input_layernorm).__name__:
            raise InputError("+awq cannot fold into Gemma's RMSNorm, which scales by 1 + weight")
        groups = [Group(block.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj))]
        if attn.v_proj.out_features == attn.o_proj.in_features:  # no grouped-query attention
            groups.append(Group(attn.v_proj, (attn.o_proj,)))
        return [*groups, Group(block.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj)),
                Group(mlp.up_proj, (mlp.down_proj,))]
    attention = getattr(block, "attention", None)
    if attention is not None and hasattr(attention, "self") and hasattr(attention, "output"):  # BERT
        return [Group(attention.self.value, (attention.output.dense,))]
    raise InputError(f"+awq knows pre-norm Llama-style blocks and BERT blocks, not {type(block).__name__}: "
                     "it would not know which op to fold the scales into")


class AWQScales(Consumer):
    """AWQ's part in a walk: at each block holding one of ``scaled`` (the layers whose config has ``+awq``), mean
    |x| and each group's Hessian on the block's inputs, the scales chosen and folded in, the fold checked on the
    first batch; the block's outputs caught before the fold are passed on (scaling is exact in full precision).
    Every block is walked (the fold check needs the blocks to be ones it knows). ``applied``: ``{layer name: s}``.

    ``finish`` records on the model (``model.lowbit_awq``, which ``quantize_model`` checks) every ``+awq`` layer,
    with None for one no op can fold into (``o_proj`` under grouped-query attention, a BERT layer's ``query``):
    those are rounded unscaled, and said so."""

    def __init__(self, model: nn.Module, plan: QuantPlan, scaled: frozenset[str]):
        self.model, self.scaled = model, scaled
        self.configs = {id(linear): (names[0], config) for names, linear, config, _ in plan_layers(model, plan)}
        self.names = {id(m): n for n, m in model.named_modules()}
        blocks = transformer_blocks(model)
        # the last block's layers: the walk goes through every block, as the fold check always has
        self.layers = tuple(self.names[id(m)] for m in blocks[-1].modules() if isinstance(m, nn.Linear))
        self.applied: dict[str, torch.Tensor] = {}
        self._stream = None

    def _config(self, module: nn.Module) -> QuantConfig | None:
        return self.configs.get(id(module), (None, None))[1]

    def _scaled(self, module: nn.Module) -> bool:
        return self.configs.get(id(module), (None, None))[0] in self.scaled

    def block(self, engine: BlockPass, block: Block) -> None:
        if self._stream is None:
            self._stream = engine.stream()
        groups = [g for g in scale_groups(block.module)
                  if any(self._scaled(m) for m in g.layers)]
        if not groups:
            self._stream.advance(block.run(self._stream))
            return
        heads = {self.names[id(g.layers[0])]: g.layers[0] for g in groups}
        found, outs = block.statistics(self._stream, heads, [HESSIAN32, ABS_MEAN])
        for group in groups:
            head = self.names[id(group.layers[0])]
            members = [(self.names[id(m)], m, self._config(m)) for m in group.layers]
            s = best_scales(members, found[HESSIAN32][head], found[ABS_MEAN][head])
            fold(group, s)
            self.applied.update({name: s for name, _, _ in members})
        (a, k), before = self._stream.inputs[0], first(outs[0])  # one batch shows a fold that is not exact
        with torch.inference_mode():
            moved = float((first(block.module(*a, **k)) - before).abs().max() / before.abs().max().clamp(min=1e-12))
        if moved > FOLD_RTOL:
            raise InputError(f"+awq: folding the scales into block {block.index} changed its output by {moved:.2g} "
                             "of its largest value; this architecture does not allow the fold")
        self._stream.advance(outs)

    def carried(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Its stream, and the scales applied so far (``applied.LAYER``); what they were folded into stays on the
        model (the engine carries the walked blocks' norms and kept weights)."""
        tensors, stream = carried_stream(self._stream)
        return {**tensors, **{f"applied.{name}": s for name, s in self.applied.items()}}, {"stream": stream}

    def restore(self, engine: BlockPass, tensors, info: dict) -> None:
        self._stream = resumed_stream(engine, tensors, info["stream"])
        self.applied = {k.removeprefix("applied."): s for k, s in tensors.items() if k.startswith("applied.")}

    def finish(self, *, progress: bool = True) -> None:
        """Say which ``+awq`` layers had no op to fold into, and record every one on the model."""
        model = self.model
        wanted = {name: None for name, _ in self.configs.values() if name in self.scaled}
        unfolded = [name for name in wanted if name not in self.applied]
        if unfolded:
            kinds = sorted({".".join(name.split(".")[-2:]) for name in unfolded})
            note(f"+awq: {len(unfolded)} layers ({', '.join(kinds)}) have no op before them to fold scales into; "
                 "they are rounded without", enabled=progress)
        setattr(model, AWQ_ATTRIBUTE, {**getattr(model, AWQ_ATTRIBUTE, {}), **wanted, **self.applied})


def best_scales(members: list[tuple[str, nn.Linear, QuantConfig | None]], hessian: torch.Tensor,
                magnitude: torch.Tensor) -> torch.Tensor:
    """The ``s`` of the grid that gives the group's quantized layers the least summed output error."""
    h = hessian.float()
    best, best_error = None, float("inf")
    for i in range(GRID):
        s = magnitude.pow(i / GRID).clamp(min=FLOOR)
        s = s / (s.max() * s.min()).sqrt()
        error = sum(output_error(name, linear.weight.detach(), config, s, h)
                    for name, linear, config in members if config is not None)
        if error < best_error:
            best, best_error = s, error
    return best


def output_error(name: str, weight: torch.Tensor, config: QuantConfig, s: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(dW H dW^T)`` of the layer rounded with its input scaled by ``s``: ``dW = Q(W diag(s)) / s - W``."""
    # the methods that change the weight on its own (+had) stay; those that need calibration are what AWQ precedes
    plain = QuantConfig(config.format, block_size=config.block_size, double_quant=config.double_quant,
                        methods=tuple(s for s in config.methods if method_for(s).needs == NOTHING))
    q, _ = rounded_layer(name, weight * s, plain)
    delta = effective_weight(name, q, plain) / s - weight.float()
    return float(((delta @ h) * delta).sum())


def fold(group: Group, s: torch.Tensor) -> None:
    """``W diag(s)`` for the group's layers, the input divided by ``s`` in the op before them."""
    for linear in group.layers:
        linear.weight.mul_(s.to(linear.weight.dtype))
    before = group.before
    if isinstance(before, nn.Linear):  # its rows make the input's channels
        before.weight.div_(s.to(before.weight.dtype)[:, None])
    else:
        before.weight.div_(s.to(before.weight.dtype))
    if getattr(before, "bias", None) is not None:
        before.bias.div_(s.to(before.bias.dtype))
