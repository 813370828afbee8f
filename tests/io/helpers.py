"""What the io tests share: a local model loaded and quantized in memory, as save_quantized takes it."""

from lowbit import load_model, quantize_model
from lowbit.planning import QuantPlan


def quantized(path, label):
    """``(model, tokenizer, info, plan, report)``: the model at ``path`` with every layer ``label`` selects swapped."""
    model, tokenizer, info = load_model(path)
    plan = QuantPlan.uniform(label)
    return model, tokenizer, info, plan, quantize_model(model, plan, progress=False)
