"""Per-layer quantization plans: ordered rules from module-name patterns to a config, first match wins.

A plan is data (torchao's ``FqnToConfig``): it is written as JSON, saved with the model, and read back
exactly. It is the only thing that selects layers: one format for every layer is ``QuantPlan.uniform(label,
include, exclude)``. Patterns match with fnmatch on the full dotted name or any dotted tail of it, so
``"lm_head"``, ``"mlp.*"`` and ``"model.layers.0.*"`` all work. A rule either names
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
from fnmatch import fnmatchcase

from ..errors import InputError
from ..json_file import load_json
from .config import QuantConfig

_RULE_KEYS = {"pattern", "format", "keep", "fallback"}
DEFAULT_EXCLUDE = ("lm_head",)  # the output head stays in full precision unless asked (README: --exclude)


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
    return QuantConfig.parse(label)


@dataclass(frozen=True)
class QuantPlan:
    rules: tuple[PlanRule, ...]
    name: str | None = None  # what reports call it instead of the formats it names (e.g. "budget 4.5")
    # set by ``uniform`` only: the plan is one label's, and reports call it by that label
    uniform_config: QuantConfig | None = None

    def __post_init__(self):
        object.__setattr__(self, "rules", tuple(self.rules))
        if not self.rules:
            raise InputError("a plan needs at least one rule")

    @classmethod
    def uniform(cls, config: QuantConfig | str, include: Iterable[str] = (), exclude: Iterable[str] = DEFAULT_EXCLUDE
                ) -> QuantPlan:
        """One format for every selected ``nn.Linear``: the layers matching ``exclude`` kept, then those matching
        ``include`` (empty: every layer) given ``config`` (a ``QuantConfig`` or a label). ``exclude`` wins."""
        config = QuantConfig.parse(config) if isinstance(config, str) else config
        include, exclude = (_patterns(p) for p in (include, exclude))
        rules = (*(PlanRule(p, None) for p in exclude), *(PlanRule(p, config) for p in include or ("*",)))
        return cls(rules, uniform_config=config)

    @property
    def include(self) -> tuple[str, ...]:
        """A uniform plan's include patterns (empty: every layer); what ``--include`` said."""
        patterns = tuple(r.pattern for r in self.rules if r.config is not None)
        return () if patterns == ("*",) else patterns

    @property
    def exclude(self) -> tuple[str, ...]:
        return tuple(r.pattern for r in self.rules if r.config is None)

    def selects(self, names: Iterable[str]) -> bool:
        """Whether a layer (by its names) is quantized: its first matching rule names a format."""
        rule = self.rule_for(names)
        return rule is not None and rule.config is not None

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
        """``plan[nf4/32+dq@amse, q6_k|q8_0]``: the formats the rules name (``|``: fallback); a uniform plan's label."""
        if self.name:
            return self.name
        if self.uniform_config is not None:
            return self.uniform_config.label
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


def selected(names: Iterable[str], include: Iterable[str] = (), exclude: Iterable[str] = DEFAULT_EXCLUDE) -> bool:
    """Whether a layer (by its names) is one ``QuantPlan.uniform(..., include, exclude)`` quantizes: no name
    matches ``exclude``, and some name matches ``include`` (empty: every layer)."""
    names, include = list(names), _patterns(include)
    if any(matches(n, p) for n in names for p in _patterns(exclude)):
        return False
    return not include or any(matches(n, p) for n in names for p in include)


def matches(name: str, pattern: str) -> bool:
    """``pattern`` (fnmatch) matches the dotted ``name`` or any dotted tail of it: ``"q_proj"`` matches
    ``"model.layers.0.self_attn.q_proj"``."""
    parts = name.split(".")
    return any(fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))


def _patterns(value) -> tuple[str, ...]:
    # a bare string would otherwise be read as one pattern per character
    return (value,) if isinstance(value, str) else tuple(value)
