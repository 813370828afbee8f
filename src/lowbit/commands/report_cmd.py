"""`lowbit report RESULTS.json -o report.html`: the HTML report of saved compare results."""

from __future__ import annotations

from ..errors import InputError
from ..files.outputs import check_outputs
from ..report.html import write_report
from ..report.result_json import read_json
from .common import check_writable_file, console


def add_parser(sub) -> None:
    p = sub.add_parser("report")
    p.add_argument("results", metavar="RESULTS.json", help="a `lowbit compare --json` (or `lowbit eval --json`) file")
    p.add_argument("-o", "--output", default="report.html", metavar="FILE",
                   help="the HTML file to write (default %(default)s)")
    add_peers_arg(p)
    p.set_defaults(run=run)


def add_peers_arg(p) -> None:
    p.add_argument("--peers", metavar="BENCH.json",
                   help="a benchmarks/bench_quality.py --json file: its peers (bitsandbytes, hqq, llama.cpp) are "
                        "drawn beside lowbit's rows in the KL figure")


def check_report_args(args, path: str) -> list[dict] | None:
    """Fail before any work: an HTML path that cannot be written, a --peers file of the wrong kind."""
    if not path.lower().endswith((".html", ".htm")):
        raise InputError(f"{path}: the report is HTML; name the file .html")
    check_writable_file(path)
    return read_json(args.peers, f"lowbit {args.command} --peers", ("bench",)) if args.peers else None


def run(args) -> int:
    peers = check_report_args(args, args.output)
    check_outputs([args.output], [args.results, args.peers])
    report = read_json(args.results, "lowbit report", ("compare",))
    missing = [key for key in ("model", "protocol", "reference") if key not in report]
    if missing:  # a page needs what the table's title, the protocol and provenance sections read
        raise InputError(f"{args.results} looks like a `lowbit compare --json` report but has no {', '.join(missing)}")
    write_report(report, args.output, peers=peers)
    console().print(f"wrote {args.output}")
    return 0
