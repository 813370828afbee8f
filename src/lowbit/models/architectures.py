"""The ``architectures`` a saved config.json names, which ``loader.model_kind`` reads back first."""

from __future__ import annotations

import copy


def with_architectures(model):
    """A copy of ``model.config`` naming its class in ``architectures``, as ``PreTrainedModel.save_pretrained``
    records it: a config.json without it (one transformers built from GGUF metadata) would leave the
    model's kind to be guessed on the next load. Without the ``quantization_config`` the model was loaded with (the
    GGUF loader records a "gguf" one): what lowbit writes is not stored that way, and a config claiming it would be
    loaded through that quantizer (an export that is sets its own)."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config
