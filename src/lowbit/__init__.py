"""lowbit: quantize language-model weights to low-bit formats and measure what each costs.

The public names load on first use (PEP 562), so that ``import lowbit.cli`` and the commands
that load no model (``lowbit --version``, ``formats``, ``memory``, ``cache``, ``report``, ...)
start without importing torch: ``import torch`` alone takes about 1.3 s.
"""

from __future__ import annotations

import sys
import types

from ._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> the submodule that defines it
_PUBLIC = {
    "FormatSpec": "formats", "formats": "formats", "get_format": "formats",
    "fake_quantize": "fake_quant", "initial_scales": "fake_quant",
    "quantize": "quantize", "QuantizedTensor": "tensor",
    # model-level API (issue 3); lowbit.models imports transformers only inside load_model
    "load_model": "models",
    "QuantConfig": "planning", "QuantLinear": "layers", "QuantPlan": "planning", "quantize_model": "layers",
}
__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC)


class _Package(types.ModuleType):
    """``lowbit.quantize`` and ``lowbit.formats`` are public functions named like the submodules
    that hold them. Importing such a submodule binds it to the package's attribute (the import
    system's rule); here that binding is skipped, so the attribute stays the function."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _PUBLIC.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
