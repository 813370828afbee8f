"""An encoder's reference: sentence embeddings computed once and cached, checked like the causal one."""

import logging

import torch

from lowbit.eval.cache import CacheFile
from lowbit.eval.encoder import encoder_reference

from .helpers import CharTokenizer, Loads, TinyEncoder, never, overwrite


def test_encoder_reference_is_checked_too(root, caplog):
    torch.manual_seed(0)
    encoder, text = TinyEncoder(), "\n\n".join(f"paragraph {i}: " + "some words to embed " * 3 for i in range(5))
    texts, emb = encoder_reference(lambda: encoder, CharTokenizer(), text, "enc-sha", text_name="t.txt",
                                   progress=False)
    assert torch.equal(encoder_reference(never, CharTokenizer(), text, "enc-sha", progress=False)[1], emb)
    [path] = root.glob("ref-encoder-*.safetensors")
    assert CacheFile(path).description["paragraphs"] == len(texts) == 5
    overwrite(path, "embeddings", b"\x00\x00\xc0\x7f")  # a float32 NaN
    loads = Loads(encoder)
    with caplog.at_level(logging.WARNING, logger="lowbit.eval.cache"):
        again = encoder_reference(loads, CharTokenizer(), text, "enc-sha", progress=False)[1]
    assert loads.calls == 1 and "embeddings fails its sha256 check" in caplog.records[0].getMessage()
    assert torch.equal(again, emb)
