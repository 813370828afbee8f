"""`lowbit sensitivity`: what quantizing each layer alone costs in KL, for each candidate format."""

from __future__ import annotations

from .. import limits as L
from ..calibration.importance import calibration_batches
from ..cluster.session import add_ray_arg, pool
from ..errors import InputError
from ..eval.protocol import DEFAULT_WINDOWS, scored_count
from ..files.atomic import write_json
from ..files.outputs import check_outputs
from ..io.model_io import local_source
from ..models.lazy import load_lazily
from ..models.loader import CAUSAL_LM
from ..planning.sensitivity import DEFAULT_CANDIDATES, MEASURES, SENSITIVITY_CALIBRATE, candidate, measure_sensitivity
from ..report.layers import sensitivity_table
from .common import add_model_arg, add_protocol_args, add_selection_args, check_protocol_args, console, load


def add_parser(sub) -> None:
    p = sub.add_parser("sensitivity")
    add_model_arg(p)
    p.add_argument("--formats", dest="candidates", default=",".join(DEFAULT_CANDIDATES), metavar="LABELS",
                   help="comma-separated candidate formats (FORMAT[/BLOCK][+dq][+had][+gptq][+cb][@SEARCH]; not +awq) "
                        "(default: %(default)s)")
    p.add_argument("--calibrate", type=L.CALIBRATE.arg("--calibrate"), default=SENSITIVITY_CALIBRATE, metavar="N",
                   help="calibration windows each layer is measured on, right after the scored ones "
                        f"(default {SENSITIVITY_CALIBRATE}; {L.CALIBRATE.text()})")
    p.add_argument("--measure", choices=MEASURES, default="anchor",
                   help="anchor: measure one candidate per layer and predict the others from the layer's output "
                        "error (default); all: measure every candidate (slower by the number of candidates)")
    p.add_argument("--anchor", metavar="LABEL", help="the candidate measured (default: the median in bits)")
    add_selection_args(p)
    add_protocol_args(p)
    add_ray_arg(p)
    p.set_defaults(run=run)


def candidate_configs(args) -> list:
    labels = [label for label in args.candidates.split(",") if label.strip()]
    if not labels:
        raise InputError("no candidate format given")
    return list({c.label: c for c in map(candidate, labels)}.values())


def measure(args, model, tokenizer, info, configs, weights):
    """The sensitivity table of ``model`` on the calibration windows after the ``--windows`` scored ones;
    ``weights``: ``load_lazily``'s, from which ``model`` is read one block at a time (None: it is in memory).
    ``--ray``: each measured (layer, candidate) a task on a cluster, the model read there from ``--model``."""
    if info.kind != CAUSAL_LM:
        raise InputError(f"sensitivity measures KL of next-token distributions; {info.name} is an encoder")
    batches, _ = calibration_batches(tokenizer, info.kind, args.text, window=args.window,
                                     scored=scored_count(info.kind, args.text, args.windows or DEFAULT_WINDOWS),
                                     count=args.calibrate)
    exclude = tuple(args.exclude) if args.exclude is not None else ("lm_head",)
    with pool(args.ray) as workers:
        return measure_sensitivity(model, configs, batches, measure=args.measure, anchor=args.anchor,
                                   include=tuple(args.include or ()), exclude=exclude, weights=weights, pool=workers,
                                   spec=args.model, file_hash=info.file_hash)


def run(args) -> int:
    configs = candidate_configs(args)
    check_protocol_args(args)
    check_outputs([args.json], [args.text, local_source(args.model)])
    con = console()
    # read one block at a time (lowbit.models.lazy): the model need not fit in memory
    model, tokenizer, info, weights = load(args.model, con, loader=lambda spec: load_lazily(spec, verify=args.verify))
    s = measure(args, model, tokenizer, info, configs, weights)
    con.print(sensitivity_table(s))
    measured = sum(c.measured for layer in s.costs.values() for c in layer.values())
    con.print(f"{len(s.numel)} layers x {len(s.candidates)} candidates: {measured} KL values measured, the rest "
              f"predicted, in {s.seconds:.0f} s")
    if args.json:
        s.model = {"name": info.name, "source": info.source, "file_hash": info.file_hash}
        write_json(args.json, s.to_dict())
        con.print(f"wrote {args.json}")
    return 0
