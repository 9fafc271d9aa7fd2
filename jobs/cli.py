"""booruset: turn booru-style illustration collections into captioned, balanced training sets.

Each command is one job over a workspace (default ./workspace); `booruset run` runs them all.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import re
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from jobs.config import Config, ConfigError, check_memory_limit, check_writable_folder, load_config, out_folder
from jobs.errors import STOPPED_BY, one_line, report_failure
from jobs.summary import JobSummary
from store.lock import SHORT_WAIT_S, WorkspaceLock
from store.workspace import Workspace, WorkspaceError

if TYPE_CHECKING:
    import duckdb

# The jobs in pipeline order; `run` runs those whose module exists.
PIPELINE = ["ingest", "annotate", "curate", "caption", "export"]
# Jobs that may start a new workspace; every other command needs an existing one.
CREATES_WORKSPACE = ("ingest", "run")
# Commands that only read the tables (the report writes its own folder): they take no lock.
READERS = ("sql", "report")
# Commands that serve instead of running jobs: they take the lock only for each write.
SERVERS = ("review",)

# command: (one-line help, example)
COMMANDS = {
    "ingest": ("read WebDataset shards / image folders (videos too) into images, source_tags, source_text, errors, "
               "clips",
               "booruset ingest -i 'shards/{000..099}.tar' -i ~/pictures/folder"),
    "annotate": ("run the detectors, CCIP and the WD tagger on every image",
                 "booruset annotate --set annotate.models='[\"cascade_face\", \"tagger\"]'"),
    "curate": ("SQL curation: tags, image facts, duplicates, character clusters, groups, balance",
               "booruset curate --set curate.tag_list=tagdata/danbooru_tags.csv"),
    "caption": ("write and score a caption for every image (template, OpenAI-compatible server or vLLM)",
                "booruset caption --set caption.backend=openai --set caption.base_url=http://gpu:8000/v1"),
    "export": ("write trainer-ready WebDataset shards (and kohya / EveryDream / Parquet layouts)",
               "booruset export --format webdataset --format kohya --where \"rating = 'general'\""),
    "run": ("run every job in order on the inputs, then write the report (no arguments: the bundled sample)",
            "booruset run -i shards/ --config my.toml"),
    "report": ("write the HTML report of a workspace (plots and example images)", "booruset report -w ws"),
    "sql": ("run SQL queries over the workspace tables (read only) and print the answers",
            "booruset sql \"select format, count(*) from images group by 1\""),
    "review": ("serve a local web page to look at, filter and correct the dataset (edits apply to the next export)",
               "booruset review -w workspace --port 8765"),
    "inputs": ("list the workspace's inputs (images, state, location), or forget one: its rows go",
               "booruset inputs -w ws; booruset inputs -w ws --forget old_collection"),
    "models": ("download every configured model into annotate.models_dir, or list what is there",
               "booruset models fetch --set annotate.models_dir=/shared/models; "
               "booruset models fetch --set annotate.models_dir=/shared/models --list"),
}


def job_runner(name: str) -> Callable[[Config, Workspace], JobSummary] | None:
    try:
        module = importlib.import_module(f"jobs.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"jobs.{name}":
            return None
        raise
    return module.run


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("booruset")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="TOML config file overriding jobs/defaults.toml")
    common.add_argument("--workspace", "-w",
                        help="workspace path or URI (default: ./workspace, or workspace.path of --config)")
    common.add_argument("--set", action="append", default=[], metavar="SECTION.OPTION=VALUE",
                        help="override one config option, nested tables too: annotate.cascade_face.min_size=32 "
                             "(repeatable)")
    common.add_argument("--verbose", "-v", action="store_true", help="show Ray's own logs and warnings")
    parser = argparse.ArgumentParser(prog="booruset", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Every option and its default: jobs/defaults.toml. "
                                            "Help on one command: booruset COMMAND --help")
    parser.add_argument("--version", action="version", version=f"booruset {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, example) in COMMANDS.items():
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text[0].upper() + help_text[1:]
                           + ".", epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_arguments(name, p)
    return parser


def _add_arguments(name: str, p: argparse.ArgumentParser) -> None:
    if name in ("ingest", "run"):
        p.add_argument("--input", "-i", action="append", default=[],
                       help="shards / folder / glob / URI to ingest (repeatable; default: the bundled sample)")
    if name in ("export", "run"):
        p.add_argument("--where", help="SQL condition over the export selection (export.where)")
        p.add_argument("--format", action="append", default=[], choices=["webdataset", "kohya", "everydream",
                                                                         "parquet"],
                       help="layout to write (repeatable; export.formats)")
        p.add_argument("--out", help="export folder (export.out; default: WORKSPACE/export)")
    if name == "sql":
        p.add_argument("query", help="SQL that only reads: select (describe, summarize, from ...) or explain, several "
                                     "separated by ';' each answered in turn; the tables are views (images, tags, "
                                     "captions, ...)")
    if name == "review":
        p.add_argument("--host", type=listen_host, default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; any other needs a token, "
                            "made if not given)")
        p.add_argument("--port", type=port_number, default=8765,
                       help="port, 0 to 65535 (default 8765; 0: any free one)")
        p.add_argument("--token", help="secret every request must carry (printed in the address to open)")
    if name == "inputs":
        p.add_argument("--forget", metavar="INPUT",
                       help="retire this input (an id the list shows): its ingest and annotate rows go now, what "
                            "the later jobs made of them at their next run")
    if name == "models":
        p.add_argument("action", choices=["fetch"], help="fetch: download the configured models")
        p.add_argument("--list", action="store_true",
                       help="only check the model files: present (size, revision), unusable (why) or missing")
        p.add_argument("--source", help="copy from this folder (hub layout <repo>/<file>) instead of the Hub")


def inputs_command(cfg: Config, ws: Workspace, forget: str | None) -> int:
    """`booruset inputs`: the list reads only; forgetting writes, under the workspace lock."""
    from jobs import inputs

    if forget is None:
        return inputs.show(ws)
    ws.check_writable()
    with WorkspaceLock(ws, "inputs", SHORT_WAIT_S):
        return inputs.forget(cfg, ws, forget)


def listen_host(text: str) -> str:
    """--host: an address, an IPv6 one also in brackets as in a URL (`[::1]`). Empty (`--host
    "$HOST"` with HOST unset) is a mistake: bind() takes "" as every address of the machine."""
    host = text.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise argparse.ArgumentTypeError("empty: give an address (an unset shell variable?); 0.0.0.0: every one")
    return host


def port_number(text: str) -> int:
    """--port: a TCP port (70000 failed in bind() with a traceback and a log file, exit 1)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is no port: 0 to 65535 (0: any free one)")
    return port


def config_from_args(args: argparse.Namespace) -> Config:
    # an empty value (`-w "$WS"` with WS unset) is a mistake, not the default: `ingest -w "" -i ""`
    # ingested the bundled sample ("" in ingest.inputs) into ./workspace; `--config ""` ran with
    # the defaults alone
    for flag, values in (("--workspace", [args.workspace]), ("--input", getattr(args, "input", [])),
                         ("--out", [getattr(args, "out", None)]), ("--config", [args.config])):
        if any(v is not None and not v.strip() for v in values):
            raise ConfigError(f"{flag} is empty: give a path (an unset shell variable?)")
    overrides = list(args.set)
    if args.workspace:
        overrides.append(f"workspace.path={_toml_string(args.workspace)}")
    if getattr(args, "input", None):
        overrides.append("ingest.inputs=[" + ", ".join(_toml_string(i) for i in args.input) + "]")
    if getattr(args, "where", None) is not None:
        overrides.append(f"export.where={_toml_string(args.where)}")
    if getattr(args, "format", None):
        # each layout once: `--format kohya --format kohya` printed its folder twice
        overrides.append("export.formats=[" + ", ".join(_toml_string(f) for f in dict.fromkeys(args.format)) + "]")
    if getattr(args, "out", None):
        overrides.append(f"export.out={_toml_string(args.out)}")
    return load_config(args.config, overrides)


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_jobs(cfg: Config, ws: Workspace, names: list[str]) -> int:
    """The jobs in order. One that drops more than ray.max_error_rate of its rows stops the run,
    but for the report, which is still written: it is where the errors are shown."""
    started, stopped, ran = time.perf_counter(), False, []
    for name in names:
        runner = job_runner(name)
        if runner is None:
            print(f"{name}: not available in this version; skipped", flush=True)
            continue
        if stopped and name != "report":
            continue
        summary = runner(cfg, ws)
        summary.print()
        ran.append(name)
        if summary.error_rate > float(cfg["ray"]["max_error_rate"]):
            print(f"{name}: error rate {summary.error_rate:.1%} > max_error_rate; stopping"
                  + ("; the report is still written" if "report" in names and name != "report" else ""),
                  file=sys.stderr, flush=True)
            stopped = True
    if len(names) > 1:
        print(f"== run finished in {time.perf_counter() - started:.1f} s; workspace {ws.root}")
    if {"export", "report"} <= set(ran):
        print_outputs(cfg, ws)
    return 1 if stopped else 0


def print_outputs(cfg: Config, ws: Workspace) -> None:
    """Where a run's results are: its export's layouts, its report, the review command."""
    from jobs.export import PLAN_STATE, nothing_selected, out_dir
    from jobs.report import report_dir

    out = out_dir(cfg, ws)
    names = {"webdataset": "shards", "kohya": "kohya folders", "everydream": "EveryDream folders",
             "parquet": "Parquet files"}
    # only the folders the export made: one that selected nothing makes none
    written = [layout for layout in cfg["export"]["formats"] if os.path.isdir(os.path.join(out, layout))]
    for layout in written:
        print(f"== {names.get(layout, layout)}: {out}/{layout}/")
    if not (ws.read_json(PLAN_STATE) or {}).get("selected", 1):
        print(f"== export: {nothing_selected(out)}")
    elif not written:
        print(f"== export: no files in {out}/ (the export summary says why)")
    print(f"== report: {report_dir(cfg, ws) / 'index.html'}")
    print(f"== look at it and correct it: booruset review -w {shlex.quote(ws.root)}")


# `booruset sql` only reads: SELECT (with DESCRIBE, SHOW, SUMMARIZE, FROM ...) and EXPLAIN of one.
READ_STATEMENTS = ("SELECT", "EXPLAIN")
# EXPLAIN ANALYZE runs the statement it explains: what follows the EXPLAIN must be a read too
EXPLAIN_PREFIX = re.compile(r"^\s*explain\s+(analyze\s+)?(\([^()]*\)\s*)?", re.I)


def statement_kind(statement: object) -> str:
    """The kind of a parsed statement; for an EXPLAIN, the kind of the statement it explains."""
    import duckdb

    kind = statement.type.name
    if kind != "EXPLAIN":
        return kind
    prefix = EXPLAIN_PREFIX.match(statement.query)
    inner = duckdb.extract_statements(statement.query[prefix.end():]) if prefix else []
    return statement_kind(inner[0]) if len(inner) == 1 else "commented EXPLAIN"  # comments hide what it explains


def sql(ws: Workspace, query: str) -> int:
    """Each statement's answer, printed; 2 for a statement that would write or that fails."""
    import duckdb

    try:
        statements = duckdb.extract_statements(query)
        if not statements:  # "", blanks, a comment or a lone ";": exit 0 with no answer read as one
            print("booruset sql: the query is empty: give one SQL statement, e.g. "
                  "booruset sql \"select count(*) from images\"", file=sys.stderr)
            return 2
        refused = [k for k in map(statement_kind, statements) if k not in READ_STATEMENTS]
        if refused:
            print(f"booruset sql: {refusal(refused[0])}", file=sys.stderr)
            return 2
        con = ws.connect(read_only=True)
        for statement in statements:
            show_answer(con, statement.query, plan=statement.type.name == "EXPLAIN")
    except duckdb.Error as exc:
        print(f"booruset sql: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader stopped reading (`booruset sql ... | head`): no failure, and nothing more to
        # write; stdout goes to /dev/null so that the flush at exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def refusal(kind: str) -> str:
    """Why a statement of this kind is not run. A PIVOT that finds its own columns (no IN list) is
    parsed as several statements (a CREATE TYPE first, then what holds the PIVOT, a COPY as well
    as a SELECT), which cannot be told apart: "MULTI statements are refused" said nothing of PIVOT."""
    if kind == "MULTI":
        return ("a PIVOT without IN runs as several statements, which are refused: name the values it spreads, "
                "pivot images on format in ('PNG', 'JPEG') using count(*)")
    return f"{kind} statements are refused: the workspace is read-only here (only {', '.join(READ_STATEMENTS)})"


def show_answer(con: duckdb.DuckDBPyConnection, query: str, plan: bool = False) -> None:
    """Print the answer of one statement (at most 200 rows), or raise its error. plan (an
    EXPLAIN): the plan's text as DuckDB drew it; in a table cell its lines were one line with
    `\n` between them, cut at 200 characters.

    It runs in a thread of its own: DuckDB's show() does not see Ctrl-C, so a query that never
    ended went on until killed. The main thread waits, and on Ctrl-C interrupts the query and
    waits for it to stop: a process that exits with DuckDB still running in a thread aborts."""
    failure: list[BaseException] = []
    done = threading.Event()  # not Thread.join: a join that Ctrl-C interrupted can return early

    def answer() -> None:
        try:
            # a relation runs when shown: a cast that fails on a row fails here, not in con.sql
            relation = con.sql(query)
            if relation is not None and plan:
                rows = relation.fetchall()
                for key, text in rows:  # (physical_plan | analyzed_plan, the drawing)
                    print(*([key] if len(rows) > 1 else []), text, sep="\n")
            elif relation is not None:
                relation.show(max_rows=200, max_width=200)
        except BaseException as exc:  # noqa: BLE001 - raised again in the main thread
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=answer, name="booruset-sql", daemon=True).start()
    try:
        while not done.wait(0.1):
            pass
    except KeyboardInterrupt:
        # again and again: DuckDB forgets an interrupt while no query runs (the statement still
        # being bound, its Parquet files read), and the query then ran to its end
        con.interrupt()
        while not done.wait(0.1):  # a second Ctrl-C leaves at once
            con.interrupt()
        raise
    if failure:
        raise failure[0]


def check_jobs(cfg: Config, names: list[str]) -> None:
    """Each job's own checks of its options (rules that tie options together, inputs that must be
    there) for every job of the command, before the first starts: `run --set export.text=bogus`
    failed at export, after the hours of the jobs before it."""
    if "ingest" in names:
        from jobs.ingest import check_inputs, frame_options

        check_inputs(cfg)
        frame_options(cfg["ingest"]["frames"])
    if "annotate" in names:
        from jobs import annotate
        from jobs.ray_env import check_task_cpus

        annotate.check_options(cfg["annotate"])
        check_task_cpus(cfg, "annotate.task_num_cpus")  # its tasks run before the pools' check (check_cpus)
    if "curate" in names:
        from jobs import curate

        curate.check_options(cfg["curate"])
    if "caption" in names:
        from jobs.caption import caption_options, check_options, check_vllm_here
        from jobs.ray_env import check_task_cpus

        check_options(caption_options(cfg))
        check_vllm_here(cfg)
        check_task_cpus(cfg, "caption.num_cpus")
    if "export" in names:
        from jobs import export
        from jobs.ray_env import check_task_cpus

        export.check_options(cfg["export"])
        check_task_cpus(cfg, "export.task_num_cpus")
    if "annotate" in names and len(names) > 1:
        # run: an unusable model file stops it now, not after hours of ingest (annotate alone
        # checks them as it starts); last, as it reads every model file
        from jobs import annotate

        annotate.check_local_cpus(cfg, annotate.available_models(cfg)[0])


def check_out_folders(cfg: Config, command: str) -> None:
    """export.out and report.out, which must be local folders, before the first job: a run on an
    s3:// workspace without them failed at export, after hours of the jobs before it."""
    path = str(cfg["workspace"]["path"])
    for job in ("export", "report"):
        if command in (job, "run"):
            check_writable_folder(f"{job}.out", out_folder(job, cfg, "://" not in path, path))
    if command in ("report", "run") and cfg["report"]["out"]:  # the workspace's own report/ is the report's
        from jobs.report import check_out

        check_out(out_folder("report", cfg, "://" not in path, path))


def check_outputs_outside_inputs(cfg: Config, command: str) -> None:
    """ConfigError when the workspace (or a run's export.out or report.out) is inside a folder it
    ingests: the next ingest read the workspace's own files as images. `cd ~/art; booruset run -i .`
    twice: 4 images became 18 (the export's copies, the report's plots and thumbnails), with 28
    no_image errors, and the run stopped at its error rate."""
    if command not in CREATES_WORKSPACE:
        return
    from jobs.ingest import input_specs

    path = str(cfg["workspace"]["path"])
    if "://" in path:
        return  # a workspace on object storage has no folder of its own here; its outs are checked below
    outputs = {"the workspace (-w)": Path(path).resolve()}
    if command == "run":
        outputs |= {f"{job}.out": out_folder(job, cfg, True, path) for job in ("export", "report")}
    folders = [Path(s).resolve() for s in input_specs(cfg) if "://" not in s and Path(s).is_dir()]
    for name, out in outputs.items():
        for folder in folders:
            if out == folder or folder in out.parents:
                raise ConfigError(f"{name} {out} is inside the input folder {folder}, and an ingest of that folder "
                                  "would read its files as images: put it outside")


def parse_command_line(argv: list[str] | None) -> argparse.Namespace:
    """The parsed arguments. An argument the command does not know is refused by the command's
    own parser (its usage line, not the top level's), naming the option meant when one is close:
    argparse in Python 3.11 suggests nothing (`--whre`: did you mean --where?; `ingets`: ingest?)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    _check_command_word(parser, argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = _command_parser(parser, args.command)
        command.error(f"unrecognized arguments: {' '.join(unknown)}{_option_hint(command, unknown)}")
    return args


def _check_command_word(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Usage errors before the command word that argparse words badly: a command's option put
    before it (`booruset -w ws sql ...` was "invalid choice: 'ws'", `--config=x sql` "unrecognized
    arguments: --config=x (did you mean --config?)"), and a misspelt command, with the one meant."""
    first = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    flags = {flag for action in parser._actions if isinstance(action, argparse._SubParsersAction)
             for command in action.choices.values() for a in command._actions for flag in a.option_strings}
    early = [a for a in argv[:first] if a.split("=", 1)[0] in flags - {"-h", "--help"}]
    if early:
        command = next((a for a in argv if a in COMMANDS), "COMMAND")
        parser.error(f"{early[0].split('=', 1)[0]} goes after the command: booruset {command} {early[0]} ...")
    if first < len(argv) and argv[first] not in COMMANDS:  # the top level has no option that takes a value
        close = difflib.get_close_matches(argv[first], list(COMMANDS), n=1, cutoff=0.6)
        parser.error(f"argument COMMAND: invalid choice: {argv[first]!r}"
                     + (f" (did you mean {close[0]}?)" if close else f" (choose from {', '.join(COMMANDS)})"))


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    # argparse keeps its subcommands' parsers only in its (private) subparsers action
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def _option_hint(command: argparse.ArgumentParser, unknown: list[str]) -> str:
    """' (did you mean --where?)' for the first unknown option close to one of the command's."""
    known = [flag for action in command._actions for flag in action.option_strings if flag.startswith("--")]
    for arg in unknown:
        if arg.startswith("--"):
            close = difflib.get_close_matches(arg.split("=", 1)[0], known, n=1, cutoff=0.7)
            if close:
                return f" (did you mean {close[0]}?)"
    return ""


def main(argv: list[str] | None = None) -> int:
    args = parse_command_line(argv)
    if args.verbose:
        os.environ["BOORUSET_VERBOSE"] = "1"
    ws = None
    try:
        cfg = config_from_args(args)
        if args.command == "models":
            from jobs import models

            return models.main(cfg, list_only=args.list, source=args.source)
        names = PIPELINE + ["report"] if args.command == "run" else [args.command]
        # every other command opens the workspace's DuckDB: "lots" failed there, a report with a traceback
        check_memory_limit("workspace.duckdb_memory_limit", str(cfg["workspace"]["duckdb_memory_limit"]))
        check_jobs(cfg, names)  # every job's options, before the first job starts
        check_out_folders(cfg, args.command)  # a mistake leaves no new, empty workspace behind
        check_outputs_outside_inputs(cfg, args.command)
        ws = Workspace(cfg["workspace"]["path"], create=args.command in CREATES_WORKSPACE,
                       memory_limit=str(cfg["workspace"]["duckdb_memory_limit"]))
        if "ingest" in names:
            from jobs.ingest import check_sample_alone

            check_sample_alone(cfg, ws)
        if args.command == "sql":
            return sql(ws, args.query)
        if args.command == "inputs":
            return inputs_command(cfg, ws, args.forget)
        if args.command in SERVERS:
            from review.server import serve

            return serve(cfg, ws, args.host, args.port, args.token)
        if args.command in READERS:  # they write nothing in the workspace: read-only access is enough
            return run_jobs(cfg, ws, names)
        ws.check_writable()
        with WorkspaceLock(ws, args.command, SHORT_WAIT_S):  # not refused by a review edit's moment
            swept = ws.sweep_temp(before=time.time())
            if swept:
                print(f"{args.command}: removed {swept} temporary files left by runs that died", flush=True)
            return run_jobs(cfg, ws, names)
    except ConfigError as exc:
        # one line: DuckDB's messages end with an excerpt of the query, a caret under it
        print(f"booruset: configuration error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except WorkspaceError as exc:
        print(f"booruset: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if STOPPED_BY:
            print(f"booruset: terminated ({signal.Signals(STOPPED_BY[0]).name})", file=sys.stderr)
            return 128 + STOPPED_BY[0]
        print("booruset: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for a person, the traceback in a log file
        return report_failure(args.command, exc, ws)


if __name__ == "__main__":
    sys.exit(main())
