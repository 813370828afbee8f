"""`lowbit generate [DIR | --model M] --prompt TEXT`: generate text with a quantized model."""

from __future__ import annotations

import sys

import torch

from .. import limits as L
from ..errors import InputError
from ..generation import check_prompt, generate
from ..models import CAUSAL_LM
from ..planning.plan import DEFAULT_EXCLUDE, QuantPlan
from .common import add_model_arg, console, load


def add_parser(sub) -> None:
    p = sub.add_parser("generate")
    p.add_argument("directory", metavar="DIR", nargs="?", help="a directory written by `lowbit quantize`")
    add_model_arg(p)
    p.add_argument("--format", metavar="LABEL",
                   help="quantize --model in memory first (a label without calibration, e.g. q4_0, nf4/64+dq)")
    p.add_argument("--include-head", action="store_true",
                   help="with --format: quantize the output head (lm_head) too, as llama.cpp does")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=L.MAX_NEW_TOKENS.arg("--max-new-tokens"), default=64, metavar="N",
                   help=f"tokens to generate (default 64; {L.MAX_NEW_TOKENS.text()})")
    p.add_argument("--temperature", type=L.TEMPERATURE.arg("--temperature"), default=0.0,
                   help=f"0 (default): greedy; above 0: sample ({L.TEMPERATURE.text()})")
    p.add_argument("--top-k", type=L.TOP_K.arg("--top-k"), metavar="K",
                   help=f"sample from the K likeliest tokens ({L.TOP_K.text()})")
    p.add_argument("--top-p", type=L.TOP_P.arg("--top-p"), metavar="P",
                   help=f"sample from the likeliest tokens holding P of the mass ({L.TOP_P.text()})")
    p.add_argument("--seed", type=L.SEED.arg("--seed"), help=f"seed for sampling ({L.SEED.text()})")
    p.add_argument("--threads", type=L.THREADS.arg("--threads"), metavar="N",
                   help=f"threads for torch and the kernels (default: torch's; {L.THREADS.text()}: "
                        f"{L.THREADS_PER_CPU} x the {L.usable_cpus()} CPUs this process may use)")
    p.set_defaults(run=run)


def run(args) -> int:
    plan = _check(args)
    con = console()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.directory:
        from ..io.model_io import load_quantized

        model, tokenizer, meta = load_quantized(args.directory)
        kind, what = meta["model"]["kind"], args.directory
    elif plan is None:
        model, tokenizer, info = load(args.model, con, verify=args.verify)
        kind, what = info.kind, info.source
    else:  # each layer's float weight is read only to be rounded (lowbit.models.lazy)
        from ..models.lazy import load_lazily
        from ..workflows.run import run

        model, tokenizer, info, weights = load(args.model, con,
                                               loader=lambda spec: load_lazily(spec, verify=args.verify))
        kind, what = info.kind, info.source
        _check_kind(kind, what)
        run(model, plan, progress=con.is_terminal, source=weights)
    _check_kind(kind, what)
    prompt = args.prompt
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(f"{what}'s tokenizer has no chat template: drop --chat")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    out = sys.stdout
    gen = generate(model, tokenizer, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, on_text=lambda s: (out.write(s), out.flush()))
    out.write("\n")
    con.print(f"[dim]{len(gen.new_ids)} tokens | prompt {len(gen.prompt_ids)} tokens at "
              f"{gen.prefill_tokens_per_second:.1f} tokens/s | decode {gen.decode_tokens_per_second:.1f} tokens/s | "
              f"{torch.get_num_threads()} threads | {gen.stepper}[/dim]", highlight=False)
    return 0


def _check_kind(kind: str, what: str) -> None:
    if kind != CAUSAL_LM:
        raise InputError(f"{what} is not a causal language model (it is an {kind}): generate needs one")


def _check(args) -> QuantPlan | None:
    """Every argument checked before anything loads; the --format plan, if any."""
    if args.directory and (args.model or args.format):
        raise InputError("give a quantized DIR or --model [--format LABEL], not both")
    if args.include_head and not args.format:
        raise InputError("--include-head goes with --format")
    # the numbers' ranges were checked as they were read (lowbit.limits); the prompt's text is checked here
    check_prompt(args.prompt)
    if not args.format:
        return None
    plan = QuantPlan.uniform(args.format, exclude=() if args.include_head else DEFAULT_EXCLUDE)
    if plan.needs_calibration:
        raise InputError(f"{args.format} needs calibration: run `lowbit quantize --format {args.format} -o DIR` "
                         "and then `lowbit generate DIR`")
    return plan
