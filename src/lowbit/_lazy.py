"""Public names of a package that load on first use (PEP 562).

A package ``__init__`` that imported its submodules eagerly made every ``lowbit.io.X`` (or
``lowbit.eval.X``, ``lowbit.models.X``) import pull in torch through a sibling: about 1.3 s
for commands such as ``lowbit cache`` that never touch a tensor.
"""

from __future__ import annotations

from importlib import import_module


def lazy_exports(package: str, where: dict[str, str]):
    """``(__getattr__, __dir__)`` for ``package``, whose public name N lives in submodule ``where[N]``."""
    namespace = import_module(package).__dict__

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f"{package}.{where[name]}"), name)
        namespace[name] = value  # once: later lookups find it without this hook
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *where})

    return __getattr__, __dir__
