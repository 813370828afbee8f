"""with_architectures: the config a save writes names the model's class, and the model's own is untouched."""

from transformers import LlamaConfig, LlamaForCausalLM

from lowbit.models.architectures import with_architectures
from lowbit.models.loader import CAUSAL_LM, model_kind


def test_the_saved_config_names_the_class_and_leaves_the_models_alone():
    model = LlamaForCausalLM(LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=32))
    model.config.architectures = None  # as transformers leaves a config it built from GGUF metadata
    config = with_architectures(model)
    assert config.architectures == ["LlamaForCausalLM"] and model.config.architectures is None
    assert model_kind(config.to_dict()) == CAUSAL_LM


def test_the_saved_config_drops_the_quantization_the_model_was_loaded_with():
    """A GGUF file loads with a "gguf" quantization_config; the model lowbit writes is not stored so, and the output
    of a run that read the GGUF file must equal that of one that read its converted copy (it differed)."""
    model = LlamaForCausalLM(LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=32))
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "m.gguf", "dequantize": False}
    config = with_architectures(model)
    assert "quantization_config" not in config.to_dict() and model.config.quantization_config["quant_method"] == "gguf"
