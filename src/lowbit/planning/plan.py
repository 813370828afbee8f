"""Per-layer quantization plans: ordered rules from module-name patterns to a config, first match wins.

A plan is data (torchao's ``FqnToConfig``): it is written as JSON, saved with the model, and read back
exactly. Patterns match as ``QuantConfig``'s include/exclude do (fnmatch on the full dotted name or any
dotted tail of it), so ``"lm_head"``, ``"mlp.*"`` and ``"model.layers.0.*"`` all work. A rule either names
a format label (``FORMAT[/BLOCK][+dq][@SEARCH]``) or keeps the layer in full precision, and may name a
``fallback`` label for layers whose shape its format cannot hold: llama.cpp falls back from ``q4_k`` to
``q5_0`` for rows that do not hold whole 256-weight blocks (src/llama-quant.cpp, ``llama_tensor_get_type``).

    {"rules": [{"pattern": "lm_head", "keep": true},
               {"pattern": "mlp.down_proj", "format": "q6_k", "fallback": "q8_0"},
               {"pattern": "*", "format": "nf4/32+dq@amse"}]}
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from difflib import get_close_matches

from ..errors import InputError
from ..json_file import load_json
from .config import QuantConfig, matches

_RULE_KEYS = {"pattern", "format", "keep", "fallback"}


@dataclass(frozen=True)
class PlanRule:
    """``config`` None keeps the matching layers in full precision."""

    pattern: str
    config: QuantConfig | None
    fallback: QuantConfig | None = None

    def __post_init__(self):
        if not isinstance(self.pattern, str) or not self.pattern.strip():
            raise InputError(f"a plan rule needs a non-empty module-name pattern, got {self.pattern!r}")
        if self.config is None and self.fallback is not None:
            raise InputError(f"rule {self.pattern!r} keeps its layers in full precision: a fallback means nothing")

    def to_dict(self) -> dict:
        if self.config is None:
            return {"pattern": self.pattern, "keep": True}
        out = {"pattern": self.pattern, "format": self.config.label}
        return out | ({"fallback": self.fallback.label} if self.fallback else {})

    @classmethod
    def from_dict(cls, d: dict, where: str = "rule") -> PlanRule:
        if not isinstance(d, dict):
            raise InputError(f"{where}: expected an object with 'pattern' and 'format' or 'keep', got {d!r}")
        unknown = sorted(set(d) - _RULE_KEYS)
        if unknown:
            raise InputError(f"{where}: unknown key {unknown[0]!r}; a rule has {', '.join(sorted(_RULE_KEYS))}")
        keep = d.get("keep", False)
        if keep not in (True, False):
            raise InputError(f"{where}: 'keep' must be true or false, got {keep!r}")
        if keep == ("format" in d):
            raise InputError(f"{where}: give either 'format' (a label such as nf4/64+dq@amse) or \"keep\": true")
        try:
            config = None if keep else _parse(d["format"])
            fallback = _parse(d["fallback"]) if "fallback" in d else None
            return cls(d.get("pattern"), config, fallback)
        except ValueError as e:
            raise InputError(f"{where}: {e}") from None


def _parse(label) -> QuantConfig:
    if not isinstance(label, str):
        raise InputError(f"a format label is a string such as 'nf4/64+dq', got {label!r}")
    return QuantConfig.parse(label, exclude=())  # the rule's pattern selects, not the config


@dataclass(frozen=True)
class QuantPlan:
    rules: tuple[PlanRule, ...]
    name: str | None = None  # what reports call it instead of the formats it names (e.g. "budget 4.5")

    def __post_init__(self):
        object.__setattr__(self, "rules", tuple(self.rules))
        if not self.rules:
            raise InputError("a plan needs at least one rule")

    @classmethod
    def from_config(cls, config: QuantConfig) -> QuantPlan:
        """The plan that selects what ``config`` selects: its excludes kept, then its includes (or all)."""
        keep = [PlanRule(p, None) for p in config.exclude]
        return cls((*keep, *(PlanRule(p, config) for p in config.include or ("*",))))

    def rule_for(self, names: Iterable[str]) -> PlanRule | None:
        """The first rule matching any of a layer's names; None when none does (the layer is left alone)."""
        names = list(names)
        return next((r for r in self.rules if any(matches(n, r.pattern) for n in names)), None)

    def unused(self, layer_names: Iterable[str]) -> list[str]:
        """A message per rule that matches none of ``layer_names``, with the closest names: a typo in a
        pattern would otherwise quietly leave layers in another format (or none)."""
        names = list(layer_names)
        tails = sorted({".".join(n.split(".")[i:]) for n in names for i in range(len(n.split(".")))})
        out = []
        for rule in self.rules:
            if not any(matches(n, rule.pattern) for n in names):
                close = get_close_matches(rule.pattern, tails, n=3, cutoff=0.5)
                hint = f"; closest names: {', '.join(close)}" if close else f"; layers are named like {names[0]}"
                out.append(f"plan rule {rule.pattern!r} matches no nn.Linear layer{hint if names else ''}")
        return out

    @property
    def configs(self) -> list[QuantConfig]:
        """Every config a rule or fallback names, each once, in order."""
        found = [c for r in self.rules for c in (r.config, r.fallback) if c is not None]
        return list({c.label: c for c in found}.values())

    @property
    def needs_calibration(self) -> bool:
        return any(c.needs_calibration for c in self.configs)

    @property
    def label(self) -> str:
        """``plan[nf4/32+dq@amse, q6_k|q8_0]``: the formats the rules name (``|``: fallback)."""
        if self.name:
            return self.name
        names = [f"{r.config.label}{'|' + r.fallback.label if r.fallback else ''}" for r in self.rules if r.config]
        return f"plan[{', '.join(dict.fromkeys(names))}]"

    def to_dict(self) -> dict:
        return ({"name": self.name} if self.name else {}) | {"rules": [r.to_dict() for r in self.rules]}

    @classmethod
    def from_dict(cls, d) -> QuantPlan:
        if not isinstance(d, dict) or not isinstance(d.get("rules"), list) or set(d) - {"rules", "name"}:
            raise InputError('a plan is an object {"rules": [...]} (and an optional "name") and nothing else')
        name = d.get("name")
        if name is not None and not (isinstance(name, str) and name.strip()):
            raise InputError(f"a plan's name is a non-empty string, got {name!r}")
        return cls(tuple(PlanRule.from_dict(r, f"rule {i + 1}") for i, r in enumerate(d["rules"])), name)

    @classmethod
    def load(cls, path) -> QuantPlan:
        """A plan from a JSON file; every problem is one ValueError naming the file."""
        return load_json(path, "plan", cls.from_dict)
