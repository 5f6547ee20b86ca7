"""The `exitflow` command. Thin: parses arguments and calls flows or the artifact store."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import sys
import traceback
from pathlib import Path

RUNNABLE = ("extract", "teacher_topk", "train_heads", "train_gates", "calibrate", "quantize", "evaluate", "pipeline",
            "all", "recalibrate")
"""Flow names (as in the Prefect UI and prefect.yaml); `all` is short for `pipeline`."""

EPILOG = """\
examples:
  exitflow run extract                                   # embedded SmolLM2 on the Python docs
  exitflow run extract --config configs/quick.yaml --set extract.layers=[4,8]
  exitflow run teacher_topk                              # the train cache's top-k, for the efficient loss
  exitflow run train_heads --set heads.epochs=3         # extracts train/eval first if missing
  exitflow run calibrate --set inputs.heads=3fa2c1     # calibrate given heads
  exitflow run evaluate --set evaluate.decode=false      # head quality, guarantees, cascade savings only
  exitflow run all                                       # extract, top-k, heads, gates, calibrate, evaluate
  exitflow run recalibrate --data-source ./data/incoming  # recalibrate on new data, drift table
  exitflow report                                        # path of the latest run's HTML report
  exitflow serve                                         # the Prefect UI, every deployment and a worker
  exitflow stop                                          # end what serve started
  exitflow ls
  exitflow show 3fa2c1
artifact root: ./.exitflow, or $EXITFLOW_HOME, or --root
"""


_USER_ERRORS = (("pipeline.config", "ConfigError"), ("pipeline.model_files", "BackboneError"),
                ("pipeline.data", "DataError"), ("stores.cache_format", "CacheError"), ("stores.artifacts", "StoreError"),
                ("flows.stages.base", "InputMismatch"), ("pipeline.thresholds", "CalibrationError"),
                ("pipeline.fit", "TrainingDiverged"), ("flows.server_process", "ServerStartError"),
                ("stores.remote", "RemoteError"))
"""(module, class) of each error that means "change the input": reported as one line."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """The user-error classes of the modules loaded so far: a module never imported raised
    nothing, and importing one now could cost seconds (torch) on the way to an error line."""
    found = (getattr(sys.modules.get(module), name, None) for module, name in _USER_ERRORS)
    return tuple(cls for cls in found if isinstance(cls, type))


def _error_message(e: BaseException, root: str | None) -> str | None:
    """The one line a known user error is reported as; None for anything else (a bug: its
    traceback is what a fix needs)."""
    if isinstance(e, _user_errors()):
        return str(e)
    full = _disk_full(e)
    if full is None:
        return None
    from stores.artifacts import default_root

    base = Path(root) if root else default_root()
    written = _written_path(full)
    inside = written is not None and Path(written).resolve().is_relative_to(base.resolve())
    where = f"under {base}" if written is None or inside else "on that disk"
    return (f"disk full while writing {written or base}: free space {where} and re-run; "
            "the run resumes where it stopped")


def _disk_full(e: BaseException | None) -> OSError | None:
    """The ENOSPC error behind `e` (itself, or what it was raised from), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _written_path(e: OSError) -> str | None:
    """The file a failed write was for: the error's own filename (open, rename), else the
    innermost frame's `path` (a write to an open file names none; zarr's and our writers
    keep the path in that local)."""
    if e.filename:
        return str(e.filename)
    found, tb = None, e.__traceback__
    while tb is not None:
        for name in ("path", "filename", "dest", "target"):
            value = tb.tb_frame.f_locals.get(name)
            if isinstance(value, (str, os.PathLike)):
                found = value
                break
        tb = tb.tb_next
    return None if found is None else os.fspath(found)


class _OneLineErrors(logging.Filter):
    """Without --debug a known user error is one line, the CLI's last: the records Prefect logs
    of it on the way out (a traceback per failed task and flow, then their failed states) are
    dropped from the terminal (the run's page in the UI keeps them). Every other record passes."""

    def __init__(self, root: str | None):
        super().__init__()
        self.root = root

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            return _error_message(record.exc_info[1], self.root) is None
        if record.name.startswith("prefect"):  # "Finished in state Failed('... DataError: ...')", at any level
            msg = record.getMessage()
            names = {c.__name__ for c in _subclasses(_user_errors())}
            return "[Errno 28]" not in msg and not any(f"{n}:" in msg or f"{n}(" in msg for n in names)
        return True


def _subclasses(classes) -> list[type]:
    out = list(classes)
    for cls in classes:
        out += _subclasses(cls.__subclasses__())
    return out


def _human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _use_running_server(root: str | None) -> None:
    """Run against the server `exitflow serve` started for this root, when it answers, instead
    of a temporary one (seconds to start, and its runs vanish with it). An explicit
    PREFECT_API_URL wins."""
    if os.environ.get("PREFECT_API_URL"):
        return
    from flows.serve import read_state, running_api_url

    url = running_api_url(root)
    if url:
        os.environ["PREFECT_API_URL"] = url
        os.environ.setdefault("EXITFLOW_REPORT_URL", read_state(root).reports_url)
        print(f"using the Prefect server at {url} (exitflow serve); runs show in its UI", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    """Run a flow. SIGINT and SIGTERM stop it at once (see flows/interrupts.py); the Prefect
    server it talks to is `exitflow serve`'s, PREFECT_API_URL's, or a child of this process
    that ends with it (flows/server_process.py)."""
    from flows.interrupts import raise_if_signalled, stop_on_signals

    with stop_on_signals(), contextlib.ExitStack() as cleanup:
        code = _run(args, cleanup)
        raise_if_signalled()
        return code


def _start_server(root: str | None, cleanup: contextlib.ExitStack):
    """The served server or PREFECT_API_URL when there is one (None); else a temporary server,
    started now so that it comes up while the CLI imports and plans, and stopped by `cleanup`
    after Prefect has sent what it still holds. PREFECT_API_URL is set before Prefect is
    imported: it reads its settings once."""
    _use_running_server(root)
    if os.environ.get("PREFECT_API_URL") or "prefect" in sys.modules:
        return None
    from flows.server_process import TemporaryServer, drain_prefect_clients

    server = TemporaryServer()  # on PREFECT_HOME's database, as Prefect's own temporary server
    os.environ["PREFECT_API_URL"] = server.start()
    # A local child that refuses connections is gone, not flaky: fail in seconds, not minutes of retries.
    os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "1")
    cleanup.callback(os.environ.pop, "PREFECT_API_URL", None)
    cleanup.callback(server.stop)
    cleanup.callback(drain_prefect_clients)  # runs first
    return server


def _run(args: argparse.Namespace, cleanup: contextlib.ExitStack) -> int:
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: telemetry only logs errors
    os.environ.setdefault("DO_NOT_TRACK", "1")
    root = str(args.root) if args.root else None
    from flows.preflight import preflight_run  # before any Prefect import or server start: a second, not half a minute

    preflight_run(args.config, args.set, args.stage, args.data_source if args.stage == "recalibrate" else None)
    server = _start_server(root, cleanup)  # before Prefect is imported: it reads its settings once
    from flows.dag import FLOWS
    from flows.stages.base import PRODUCED_BY
    from pipeline.config import load_config
    from stores.artifacts import ArtifactStore

    load_config(args.config, args.set)
    ArtifactStore(root)
    if server is not None:
        server.wait_ready(float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]))
    kwargs = {"config_path": args.config, "overrides": args.set, "root": root}
    if args.stage == "extract":
        kwargs["split"] = args.split
    elif args.split:
        raise SystemExit("error: --split applies to `run extract` only")
    if args.stage == "recalibrate":
        from flows.recalibrate import recalibrate_flow

        out = recalibrate_flow(**kwargs, data_source=args.data_source)
        if out.get("skipped"):
            print(out["reason"])
            return 0
        print(f"calibration  {out['calibration']}")
        print(f"previous     {out['previous']}")
        print(f"promoted     {out['promoted']}: {out['reason']}")
        if out.get("recalibrate"):
            print(f"drift table: {ArtifactStore(root).path('recalibrate', out['recalibrate']) / 'drift.md'}")
        return 0
    elif args.data_source:
        raise SystemExit("error: --data-source applies to `run recalibrate` only")
    result = FLOWS["pipeline" if args.stage == "all" else args.stage](**kwargs)
    store = ArtifactStore(root)
    keys = {name: key for name, key in result.items() if key}
    for name, key in keys.items():
        stage = PRODUCED_BY[name]
        m = store.manifest(stage, key)
        what = f"{m.extra.get('split')} cache, {m.metrics['tokens']} tokens" if stage == "extract" else stage
        print(f"{name:12s} {key}  {what}, {_human_size(store.size(stage, key))}")
    last_name, last_key = list(keys.items())[-1]
    print(f"path: {store.path(PRODUCED_BY[last_name], last_key)}")
    if "calibration" in keys:
        print(f"calibration: {store.path('calibrate', keys['calibration']) / 'calibration.json'}")
    from reports.evaluation import evaluation_summary

    for name, title in (("evaluation", "float heads"), ("ternary_evaluation", "ternary heads")):
        if name in keys:
            print(f"\n{title}:\n" + evaluation_summary(store.manifest("evaluate", keys[name]).metrics))
    if "report" in keys:
        from reports.index import report_html_path

        print(f"\nreport: {report_html_path(store, keys['report']).resolve()}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from reports.index import latest_report, report_html_path, write_index
    from stores.artifacts import ArtifactNotFound, ArtifactStore

    store = ArtifactStore(args.root)
    key = store.resolve(args.key, "report").key if args.key else latest_report(store)
    if key is None:
        raise ArtifactNotFound(f"no report under {store.location} yet; every `exitflow run` ends with one")
    print(report_html_path(store, key).resolve())
    if args.index:
        print(write_index(store).resolve())
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """Every config key with its value and meaning, as YAML a user can copy from."""
    from pipeline.config import Config, load_config

    cfg = load_config(args.config, args.set)
    values = cfg.model_dump(mode="json")
    lines = ["# exitflow configuration: the defaults, with --config/--set applied. A YAML file sets",
             "# only the keys that differ; `exitflow run STAGE --config FILE --set section.key=value`."]
    for section, field in Config.model_fields.items():
        model = field.annotation
        lines += ["", f"{section}:" + (f"  # {_one_line(model.__doc__)}" if model.__doc__ else "")]
        for name, sub in model.model_fields.items():
            value = json.dumps(values[section][name])
            lines.append(f"  {name}: {value}" + (f"  # {_one_line(sub.description)}" if sub.description else ""))
    print("\n".join(lines))
    return 0


def _one_line(text: str) -> str:
    return " ".join(text.split())


def cmd_ls(args: argparse.Namespace) -> int:
    from stores.artifacts import ArtifactStore, BrokenArtifact

    store = ArtifactStore(args.root, writable=False)
    rows = []
    for m in store.listing(args.stage):
        size = _human_size(store.size(m.stage, m.key))
        if isinstance(m, BrokenArtifact):
            rows.append((m.stage, m.key[:16], "BROKEN", size, m.created, f"{m.reason}; `exitflow verify {m.key[:16]}`"))
            continue
        inputs = ", ".join(f"{k}={v[:12]}" for k, v in m.inputs.items()) or m.extra.get("split", "")
        quick = store.verify(m.stage, m.key, checksums=False)  # every file there, with its size
        status = "ok" if quick.ok else "BROKEN"
        rows.append((m.stage, m.key[:16], status, size, m.created, inputs if quick.ok else quick.summary()))
    if not rows:
        print(f"no artifacts under {store.location}")
        return 0
    header = ("STAGE", "KEY", "STATUS", "SIZE", "CREATED", "INPUTS")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from stores.artifacts import ArtifactStore, BrokenArtifact

    store = ArtifactStore(args.root, writable=False)
    m = store.find(args.key)
    if isinstance(m, BrokenArtifact):
        print(f"BROKEN: {m.message()}")
        return 1
    quick = store.verify(m.stage, m.key, checksums=False)
    status = "ok (files present with their sizes; `exitflow verify` checks their contents)" if quick.ok else \
        f"BROKEN: {quick.summary()}; `exitflow verify {m.key[:16]} --delete` removes it"
    print(json.dumps({**m.to_dict(), "path": str(store.path(m.stage, m.key)), "status": status}, indent=2, sort_keys=True))
    return 0 if quick.ok else 1


def cmd_verify(args: argparse.Namespace) -> int:
    from stores.artifacts import ArtifactStore

    store = ArtifactStore(args.root, writable=args.delete)
    targets = [store.find(k) for k in args.keys] if args.keys else list(store.listing())
    broken = 0
    for a in targets:
        result = store.verify(a.stage, a.key)
        print(result.line(), flush=True)
        if not result.ok:
            broken += 1
            if args.delete:
                store.delete(a.stage, a.key)
                print(f"        deleted {store.path(a.stage, a.key)}; re-run its stage to rebuild it")
    if not targets:
        print(f"no artifacts under {store.location}")
    return 1 if broken else 0


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.serve import run_command

    if args.command != "serve":
        return run_command(args.command, args.root)
    return run_command("serve", args.root, host=args.host, port=args.port, report_port=args.report_port,
                       timeout=args.timeout)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="exitflow",
        description="Train early-exit heads and exit gates for a frozen language model from a "
        "hidden-state cache; every stage is a resumable, content-addressed Prefect task.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--root", default=None, help="artifact root: a folder or a URL (file://, s3://, gs://; default: "
                   "$EXITFLOW_HOME or ./.exitflow)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of every error (without it a known user error is one `error:` line)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a stage (a cache hit when its inputs are unchanged)",
                         description="Run a stage as a Prefect flow, its upstream stages first "
                         "(cache hits when unchanged). Same inputs: no work.")
    run.add_argument("stage", choices=RUNNABLE, help="stage to run; `pipeline` (or `all`) runs every stage")
    run.add_argument("--config", help="YAML config file setting what differs from the defaults (`exitflow config` lists them)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set extract.layers=[6,12] (repeatable)")
    run.add_argument("--split", choices=("train", "calib", "eval"), default=None,
                     help="split to extract (default: extract.split from the config)")
    run.add_argument("--data-source", default=None, metavar="PATH",
                     help="recalibrate: the data to recalibrate on (e.g. a folder receiving new files); "
                     "default: data.source from the config")
    run.set_defaults(func=cmd_run)

    config = sub.add_parser("config", help="print every config key with its default (or effective) value and meaning",
                            description="Print the configuration as YAML with one comment per key: the defaults, "
                            "or the effective config with --config and --set applied.")
    config.add_argument("--config", help="YAML config file to apply over the defaults")
    config.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a value (repeatable)")
    config.set_defaults(func=cmd_config)

    ls = sub.add_parser("ls", help="list artifacts: stage, key, status (BROKEN: no readable manifest), size, created, inputs")
    ls.add_argument("--stage", default=None, help="only this stage")
    ls.set_defaults(func=cmd_ls)

    report = sub.add_parser("report", help="print the path of the latest run's HTML report (or a given one)",
                            description="Print the path of an HTML report: the newest under the root, or the "
                            "report artifact KEY. Reports open offline in any browser.")
    report.add_argument("key", nargs="?", default=None, help="report artifact key or a unique prefix of it")
    report.add_argument("--index", action="store_true", help="also print the path of the index of every report")
    report.set_defaults(func=cmd_report)

    serve = sub.add_parser("serve", help="start the Prefect UI with every deployment, a worker and the report server",
                           description="Start, in the background, a Prefect server whose database lives under the "
                           "artifact root, deploy every flow, start a worker and a server for the HTML reports; "
                           "print the UI address. `exitflow stop` ends exactly what this started.")
    serve.add_argument("--host", default="127.0.0.1", help="address the UI and the reports listen on")
    serve.add_argument("--port", type=int, default=4200, help="Prefect UI and API port")
    serve.add_argument("--report-port", type=int, default=4201, help="port of the HTML report server")
    serve.add_argument("--timeout", type=float, default=180.0, help="seconds allowed to each start-up step")
    serve.set_defaults(func=cmd_serve)
    stop = sub.add_parser("stop", help="stop what `exitflow serve` started for this root")
    stop.set_defaults(func=cmd_serve)
    status = sub.add_parser("status", help="say what `exitflow serve` runs for this root")
    status.set_defaults(func=cmd_serve)

    show = sub.add_parser("show", help="print an artifact's manifest")
    show.add_argument("key", help="artifact key or a unique prefix of it")
    show.set_defaults(func=cmd_show)

    verify = sub.add_parser("verify", help="check every file of artifacts against its recorded size and checksum",
                            description="Check every file of the given artifacts (all, when none is given) against "
                            "the size and checksum recorded when it was written; one line per artifact. Exit 1 if "
                            "any is broken. With --delete, broken artifacts are removed so a re-run rebuilds them.")
    verify.add_argument("keys", nargs="*", metavar="KEY", help="artifact key or a unique prefix of it")
    verify.add_argument("--delete", action="store_true", help="remove each broken artifact")
    verify.set_defaults(func=cmd_verify)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore"):  # one line per Prefect API call otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    root = str(args.root) if args.root else None
    if not args.debug:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_OneLineErrors(root))
    try:
        return args.func(args)
    except Exception as e:
        message = _error_message(e, root)
        if message is None:
            raise
        if args.debug:
            traceback.print_exc()
        print(f"error: {message}", file=sys.stderr)
        return 2
    except BaseException as e:
        from flows.interrupts import as_interrupt, exit_code, interrupted_message

        interrupt = as_interrupt(e)
        if interrupt is None:
            raise
        print(interrupted_message(interrupt), file=sys.stderr)
        return exit_code(interrupt)


if __name__ == "__main__":
    sys.exit(main())
