"""lowbit.eval: the evaluation protocol, cached references, and scores against them."""

from .causal import score_causal
from .encoder import encoder_reference, score_encoder
from .protocol import Protocol, read_text, token_windows
from .reference import Reference, causal_reference

__all__ = ["Protocol", "Reference", "causal_reference", "encoder_reference", "read_text",
           "score_causal", "score_encoder", "token_windows"]
