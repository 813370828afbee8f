"""lowbit.planning: what each layer becomes. ``QuantConfig`` (one label: tensor format and methods), ``QuantPlan``
(pattern -> config rules, the one layer selector), sensitivity tables and budgets. Its names load on first use
(lowbit._lazy), so that reading a label (`lowbit formats LABEL`) imports no torch."""

from .._lazy import lazy_exports

# public name -> its submodule
_WHERE = {"PlanRule": "plan", "QuantConfig": "config", "QuantPlan": "plan"}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
