"""The ``architectures`` a saved config.json names, which ``loader.model_kind`` reads back first."""

from __future__ import annotations

import copy


def with_architectures(model):
    """A copy of ``model.config`` naming its class in ``architectures``, as ``PreTrainedModel.save_pretrained``
    records it: a config.json without it (one transformers built from GGUF metadata) would leave the
    model's kind to be guessed on the next load."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    return config
