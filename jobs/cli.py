"""The `booruset` command: one sub-command per job, plus `run` (all jobs) and `sql`."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Callable

from jobs.config import Config, ConfigError, load_config
from jobs.summary import JobSummary
from jobs.workspace import Workspace

# The jobs in pipeline order; `run` runs those whose module exists.
PIPELINE = ["ingest", "annotate", "curate", "caption", "export"]


def job_runner(name: str) -> Callable[[Config, Workspace], JobSummary] | None:
    try:
        module = importlib.import_module(f"jobs.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"jobs.{name}":
            return None
        raise
    return module.run


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="TOML config file (defaults: jobs/defaults.toml)")
    common.add_argument("--workspace", "-w", help="workspace path or URI (workspace.path)")
    common.add_argument("--set", action="append", default=[], metavar="SECTION.OPTION=VALUE",
                        help="override one config option (repeatable)")
    parser = argparse.ArgumentParser(prog="booruset", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in PIPELINE + ["run", "report"]:
        p = sub.add_parser(name, parents=[common], help={"run": "run every job, then write the report",
                                                         "report": "write the HTML report of a workspace"}.get(
                                                             name, f"run the {name} job"))
        if name in ("ingest", "run"):
            p.add_argument("--input", "-i", action="append", default=[],
                           help="shards / folder / glob / URI to ingest (repeatable; default: bundled sample)")
        if name in ("export", "run"):
            p.add_argument("--where", help="SQL condition over the export selection (export.where)")
            p.add_argument("--format", action="append", default=[], choices=["webdataset", "kohya", "everydream",
                                                                             "parquet"],
                           help="layout to write (repeatable; export.formats)")
            p.add_argument("--out", help="export folder (export.out)")
    p = sub.add_parser("sql", parents=[common], help="run a SQL query over the workspace tables")
    p.add_argument("query")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = list(args.set)
    if args.workspace:
        overrides.append(f"workspace.path={_toml_string(args.workspace)}")
    if getattr(args, "input", None):
        overrides.append("ingest.inputs=[" + ", ".join(_toml_string(i) for i in args.input) + "]")
    if getattr(args, "where", None) is not None:
        overrides.append(f"export.where={_toml_string(args.where)}")
    if getattr(args, "format", None):
        overrides.append("export.formats=[" + ", ".join(_toml_string(f) for f in args.format) + "]")
    if getattr(args, "out", None):
        overrides.append(f"export.out={_toml_string(args.out)}")
    return load_config(args.config, overrides)


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_jobs(cfg: Config, names: list[str]) -> int:
    ws = Workspace(cfg["workspace"]["path"])
    started = time.perf_counter()
    for name in names:
        runner = job_runner(name)
        if runner is None:
            print(f"{name}: not available in this version; skipped", flush=True)
            continue
        summary = runner(cfg, ws)
        summary.print()
        if summary.error_rate > float(cfg["ray"]["max_error_rate"]):
            print(f"{name}: error rate {summary.error_rate:.1%} > max_error_rate; stopping", file=sys.stderr)
            return 1
    if len(names) > 1:
        print(f"== run finished in {time.perf_counter() - started:.1f} s; workspace {ws.root}")
    if "report" in names and "export" in names:
        from jobs.export import out_dir
        from jobs.report import report_dir

        print(f"== shards: {out_dir(cfg, ws)}/webdataset/\n== report: {report_dir(cfg, ws) / 'index.html'}")
    return 0


def sql(cfg: Config, query: str) -> int:
    con = Workspace(cfg["workspace"]["path"]).connect()
    result = con.sql(query)
    if result is not None:
        result.show(max_rows=200, max_width=200)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.command == "sql":
            return sql(cfg, args.query)
        return run_jobs(cfg, PIPELINE + ["report"] if args.command == "run" else [args.command])
    except ConfigError as exc:
        print(f"booruset: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
