"""The `slmops` command line: the UI, runs, and dataset import, on the same store as the UI.

Run as: slmops --help
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from pipelines import STEPS
from pipelines.base import config_from_dict
from pipelines.benchmark import BenchmarkConfig
from pipelines.dataset import DatasetConfig
from pipelines.finetune import FinetuneConfig
from pipelines.quantize import QuantizeConfig
from pipelines.reports import for_step
from studio import store
from studio.flags import add_config_flags, config_values
from studio.jobs import JobRunner, config_of
from studio.settings import Settings
from studio.store import RunStatus
from studio.ui import views


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    if args.home:
        settings = Settings(**{**settings.__dict__, "home": Path(args.home).resolve()})
    if not args.command:
        parser.print_help()
        raise SystemExit(0)
    raise SystemExit(args.func(settings, args) or 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slmops", description="SLMOps Studio command line.")
    parser.add_argument(
        "--home", help="studio data folder (default: $STUDIO_HOME or ./studio-data)"
    )
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("ui", help="start the web UI (same as python app.py)")
    p.set_defaults(func=cmd_ui)
    p = sub.add_parser("run", help="queue a run of STEP from a JSON config")
    p.add_argument("step", choices=sorted(STEPS))
    p.add_argument("--config", required=True, help="JSON file with the step's config")
    p.add_argument("--name", default="")
    p.add_argument("--follow", action="store_true", help="run it now and print its progress")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("runs", help="list runs")
    p.add_argument("--step", choices=sorted(STEPS))
    p.add_argument("--status", choices=store.STATUSES)
    p.add_argument("--limit", type=int, default=30)
    p.set_defaults(func=cmd_runs)
    p = sub.add_parser("show", help="one run: status, config, summary, artifacts, lineage")
    p.add_argument("run_id")
    p.set_defaults(func=cmd_show)
    for name, doc in (
        ("cancel", "cancel a queued or running run"),
        ("rerun", "queue a new run with the same config"),
        ("resume", "continue a stopped run from its last checkpoint"),
    ):
        p = sub.add_parser(name, help=doc)
        p.add_argument("run_id")
        p.add_argument("--follow", action="store_true", help="(rerun/resume) run it now")
        p.set_defaults(func=cmd_control, action=name)
    data = sub.add_parser("dataset", help="dataset commands").add_subparsers(
        dest="dataset_command", required=True
    )
    p = data.add_parser("import", help="import files (or a Hub dataset) and print the report")
    p.add_argument("files", nargs="*", help="CSV, TSV, JSON, JSONL, Parquet or TXT files")
    p.add_argument("--split", help="train,validation,test shares, e.g. 0.8,0.1,0.1")
    add_config_flags(
        p,
        DatasetConfig,
        skip=("files", "train_ratio", "validation_ratio", "test_ratio"),
        aliases={"hub_dataset": ("--hub",)},
    )
    p.set_defaults(func=cmd_dataset_import)
    p = sub.add_parser("finetune", help="finetune a model (flags as in `olive finetune`)")
    p.add_argument("--config", help="JSON file with a finetune config; flags override it")
    p.add_argument("--data_files", nargs="+", help="files to import first, then train on")
    p.add_argument("--system-prompt", default="", help="with --data_files: the system prompt")
    p.add_argument("--output_path", help="copy the adapter and merged model here when done")
    p.add_argument("--name", default="", help="the run's name")
    p.add_argument("--detach", action="store_true", help="queue and return at once")
    add_config_flags(
        p,
        FinetuneConfig,
        aliases={"base_model": ("--model_name_or_path",), "dataset_dir": ("--dataset",)},
    )
    p.set_defaults(func=cmd_finetune)
    p = sub.add_parser(
        "quantize", help="to ONNX Runtime GenAI with a quality gate (flags as in the model builder)"
    )
    p.add_argument("--config", help="JSON file with a quantize config; flags override it")
    p.add_argument(
        "--extra_options",
        nargs="+",
        metavar="KEY=VALUE",
        help="model builder options, e.g. block_size=32 accuracy_level=4 algo_config=k_quant_last",
    )
    p.add_argument("-o", "--output", help="copy the quantized folder here when done")
    p.add_argument("--name", default="", help="the run's name")
    p.add_argument("--detach", action="store_true", help="queue and return at once")
    add_config_flags(
        p,
        QuantizeConfig,
        skip=("extra_options",),
        aliases={
            "model": ("-m", "-i", "--input"),
            "precision": ("-p",),
            "execution_provider": ("-e",),
            "dataset_dir": ("--dataset",),
        },
    )
    p.set_defaults(func=cmd_quantize)
    p = sub.add_parser("serve", help="serve ONNX models with an OpenAI-compatible API")
    p.add_argument("models", nargs="+", metavar="MODEL_DIR", help="ONNX folders (or NAME=DIR)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=None,
        help="require this key (Bearer); default: $STUDIO_RUNTIME_API_KEY, else none",
    )
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser(
        "quickstart",
        help="the whole journey on the sample dataset (import, distill, LoRA, int4), then serve",
    )
    p.add_argument("--port", type=int, default=0, help="serve on this port (default: a free one)")
    p.add_argument("--no-serve", action="store_true", help="stop after the quantized model")
    p.set_defaults(func=cmd_quickstart)
    p = sub.add_parser(
        "bench-endpoint", help="benchmark an OpenAI-compatible endpoint (latency, TTFT, tokens/s)"
    )
    p.add_argument("url", help="base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--name", default="", help="the run's name")
    p.add_argument("--detach", action="store_true", help="queue and return at once")
    add_config_flags(p, BenchmarkConfig, skip=("url",), aliases={"prompts_file": ("--prompts",)})
    p.set_defaults(func=cmd_bench_endpoint)
    p = sub.add_parser(
        "distill", help="teacher answers -> student training -> student-vs-teacher report"
    )
    p.add_argument(
        "--config",
        required=True,
        help='JSON: {"dataset_dir", "synthesize": {...}, "finetune": {...}, "evaluate": {...}, '
        '"logits": true}',
    )
    p.add_argument("--name", default="")
    p.add_argument("--detach", action="store_true", help="queue and return at once")
    p.set_defaults(func=cmd_distill)
    return parser


def cmd_ui(settings: Settings, args: argparse.Namespace) -> int:
    from studio.ui.app import launch

    store.init(settings.home)
    print(
        f"SLMOps Studio: http://{settings.host}:{settings.port}  (data in {settings.home})",
        flush=True,
    )
    launch(settings)
    return 0


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    try:
        data = json.loads(Path(args.config).read_text())
        config = config_from_dict(STEPS[args.step].CONFIG, _absolute_paths(data))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _submit(settings, args.step, config, args.name, args.follow)[0]


def cmd_runs(settings: Settings, args: argparse.Namespace) -> int:
    store.init(settings.home)
    with store.connect(settings.home) as db:
        rows = store.list_runs(db, step=args.step, status=args.status, limit=args.limit)
    print(f"{'run':<22} {'step':<10} {'status':<12} {'progress':>8}  name")
    for r in rows:
        print(
            f"{r['id']:<22} {r['step']:<10} {r['status']:<12} "
            f"{100 * (r['progress'] or 0):>7.0f}%  {r['name']}"
        )
    return 0


def cmd_show(settings: Settings, args: argparse.Namespace) -> int:
    store.init(settings.home)
    with store.connect(settings.home) as db:
        row = store.get_run(db, args.run_id)
        if row is None:
            print(f"error: no run {args.run_id}", file=sys.stderr)
            return 1
        outputs = store.artifacts(db, run_id=args.run_id)
        links = store.lineage(db, args.run_id)
    print(f"{row['id']}  {row['step']}  {row['status']}  {row['name']}")
    print(
        f"created {row['created_at']}  started {row['started_at']}  finished {row['finished_at']}"
        f"  duration {views.duration(views.elapsed_s(row))}"
    )
    if row["error"]:
        print(f"error: {row['error']}")
    print("config:", json.dumps(json.loads(row["config_json"]), indent=2))
    if row["summary_json"]:
        summary = json.loads(row["summary_json"])
        print(for_step(row["step"], summary).text())
    for a in outputs:
        print(f"artifact: {a['kind']} {a['name']} {settings.home / a['path']} ({a['bytes']} bytes)")
    for i in links["inputs"]:
        print(f"input ({i['role']}): {i['kind']} {i['name']} from run {i['made_by']}")
    for u in links["used_by"]:
        print(f"used by: {u['run_id']} ({u['step']}, {u['status']})")
    return 0


def cmd_control(settings: Settings, args: argparse.Namespace) -> int:
    runner = _runner(settings)
    with store.connect(settings.home) as db:
        row = store.get_run(db, args.run_id)
    if row is None:
        print(f"error: no run {args.run_id}", file=sys.stderr)
        return 1
    try:
        if args.action == "cancel":
            print(f"{args.run_id}: {runner.cancel(args.run_id)}")
            return 0
        if args.action == "rerun":
            return _submit(
                settings,
                row["step"],
                config_of(row),
                row["name"],
                args.follow,
                depends_on=row["depends_on"],
            )[0]
        run_id = runner.resume(args.run_id)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"queued {run_id} (resumes {args.run_id})")
    return _follow(settings, run_id) if args.follow else 0


def cmd_dataset_import(settings: Settings, args: argparse.Namespace) -> int:
    try:
        values = {"max_file_mb": settings.max_upload_mb, **config_values(args)}
        if args.split:
            shares = [float(x) for x in args.split.split(",")]
            if len(shares) != 3:
                raise ValueError(f"--split needs three shares like 0.8,0.1,0.1, got {args.split!r}")
            values.update(zip(("train_ratio", "validation_ratio", "test_ratio"), shares))
        for path in args.files:
            if not Path(path).is_file():
                raise ValueError(f"{path}: file not found")
        values["files"] = [str(Path(f).resolve()) for f in args.files]
        config = DatasetConfig(**values)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    store.init(settings.home)
    config = dataclasses.replace(config, files=store.keep_uploads(settings.home, config.files))
    return _submit(settings, "dataset", config, config.name, follow=True)[0]


def cmd_finetune(settings: Settings, args: argparse.Namespace) -> int:
    try:
        data = json.loads(Path(args.config).read_text()) if args.config else {}
        data.update(config_values(args))
        if not args.data_files and "dataset_dir" not in data:
            raise ValueError("give --dataset (an imported dataset folder) or --data_files")
        data = _absolute_paths(data)
        for path in args.data_files or []:
            if not Path(path).is_file():
                raise ValueError(f"{path}: file not found")
        if args.data_files:  # the import's output folder is known before it runs
            data["dataset_dir"] = "(set below)"
        config = FinetuneConfig(**data)
    except (OSError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    imported = None
    if args.data_files:
        store.init(settings.home)
        import_config = DatasetConfig(
            name=Path(args.data_files[0]).stem,
            system_prompt=args.system_prompt,
            files=store.keep_uploads(settings.home, args.data_files),
            tokenizer_model=config.base_model,
            max_file_mb=settings.max_upload_mb,
        )
        runner = _runner(settings)
        imported = runner.submit("dataset", import_config, name=import_config.name)
        print(f"queued {imported} (dataset import)", flush=True)
        config = dataclasses.replace(config, dataset_dir=str(runner.output(imported, "dataset")))
    code, run_id = _submit(
        settings,
        "finetune",
        config,
        args.name or f"finetune {config.method}",
        follow=not args.detach,
        depends_on=imported,
    )
    if code == 0 and args.output_path and not args.detach:
        _copy_outputs(settings, run_id, Path(args.output_path))
    return code


def cmd_quantize(settings: Settings, args: argparse.Namespace) -> int:
    try:
        data = json.loads(Path(args.config).read_text()) if args.config else {}
        data.update(config_values(args))
        if args.extra_options:
            data["extra_options"] = " ".join(args.extra_options)
        config = QuantizeConfig(**_absolute_paths(data))
    except (OSError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    code, run_id = _submit(
        settings, "quantize", config, args.name or config.recipe(), follow=not args.detach
    )
    if code == 0 and not args.detach:
        with store.connect(settings.home) as db:
            summary = json.loads(store.get_run(db, run_id)["summary_json"] or "{}")
        if "gate" in summary:
            print(for_step("quantize", summary).text())
        if args.output:
            _copy_outputs(settings, run_id, Path(args.output), kinds=("onnx", "model"))
    return code


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    import os

    from studio import runtime

    key = args.api_key if args.api_key is not None else os.environ.get(runtime.API_KEY_ENV, "")
    try:
        runtime.model_names(args.models)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runtime.serve(args.models, host=args.host, port=args.port, api_key=key)
    return 0


def cmd_quickstart(settings: Settings, args: argparse.Namespace) -> int:
    """Queue the quick start chain, follow each run, print the report, serve the model."""
    from studio import deploy, quickstart

    runner = _runner(settings)
    runs = quickstart.submit(runner)
    owns = runner.start()
    try:
        for step in quickstart.ORDER:
            print(f"--- {quickstart.LABELS[step]} ({runs[step]})", flush=True)
            code = _follow(settings, runs[step])
            if code:
                return code
    finally:
        if owns:
            runner.stop()
    print("\n" + quickstart.format_report(quickstart.report(settings.home, runs)), flush=True)
    if args.no_serve:
        return 0
    folder = quickstart.onnx_folder(settings.home, runs)
    server_id = deploy.start_server(settings.home, {"quickstart-int4": str(folder)}, args.port)
    row = deploy.wait_serving(settings.home, server_id)
    if row["status"] != "serving":
        print(f"error: the runtime did not start: {row['error']}", file=sys.stderr)
        return 1
    print(
        f"serving at {deploy.url(row)} as quickstart-int4 (pid {row['pid']}; stop it in the "
        "Deploy tab or with kill)",
        flush=True,
    )
    return 0


def cmd_bench_endpoint(settings: Settings, args: argparse.Namespace) -> int:
    """Queue a benchmark run against URL (its key from $STUDIO_RUNTIME_API_KEY) and print it."""
    try:
        config = BenchmarkConfig(**_absolute_paths({"url": args.url, **config_values(args)}))
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    code, _ = _submit(
        settings, "benchmark", config, args.name or f"benchmark {args.url}", not args.detach
    )
    return code


def cmd_distill(settings: Settings, args: argparse.Namespace) -> int:
    """Queue the distill chain; follow it to the report unless --detach."""
    from studio import distill

    try:
        spec = json.loads(Path(args.config).read_text())
        spec = {
            key: _absolute_paths(value) if isinstance(value, dict) else value
            for key, value in _absolute_paths(spec).items()
        }
        distill.plan(spec)  # every mistake shows before anything is queued
    except (OSError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runner = _runner(settings)
    runs = distill.submit(runner, spec, name=args.name)
    for step, run_id in runs.items():
        print(f"queued {run_id} ({step})", flush=True)
    if args.detach:
        return 0
    owns = runner.start()
    try:
        for step, run_id in runs.items():
            print(f"--- {step} ({run_id})", flush=True)
            code = _follow(settings, run_id)
            if code:
                return code
    finally:
        if owns:
            runner.stop()
    with store.connect(settings.home) as db:
        summary = json.loads(store.get_run(db, runs["evaluate"])["summary_json"])
    print(for_step("evaluate", summary).text())
    return 0


def _copy_outputs(
    settings: Settings, run_id: str, target: Path, kinds: tuple[str, ...] = ()
) -> None:
    """--output_path: copy a run's artifacts (adapter/, merged/, onnx/...) to a folder."""
    import shutil

    with store.connect(settings.home) as db:
        outputs = [a for a in store.artifacts(db, run_id=run_id) if not kinds or a["kind"] in kinds]
    target.mkdir(parents=True, exist_ok=True)
    for a in outputs:
        source = settings.home / a["path"]
        shutil.copytree(source, target / source.name, dirs_exist_ok=True)
        print(f"copied {source.name}/ to {target / source.name}")


def _runner(settings: Settings) -> JobRunner:
    """The one way the CLI builds its runner (same queues and grace period as the UI's)."""
    return JobRunner(settings.home, queues=settings.queues, grace_s=settings.cancel_grace_s)


def _submit(
    settings: Settings, step: str, config, name: str, follow: bool, depends_on: str | None = None
) -> tuple[int, str]:
    """Queue a run; with `follow`, run it now (unless the UI's runner does) and print it."""
    runner = _runner(settings)
    run_id = runner.submit(step, config, name=name, depends_on=depends_on)
    print(f"queued {run_id}", flush=True)
    if not follow:
        return 0, run_id
    owns = runner.start()  # if the UI is running, its runner executes the run; else we do
    try:
        return _follow(settings, run_id), run_id
    finally:
        if owns:
            runner.stop()


def _follow(settings: Settings, run_id: str) -> int:
    """Print the run's events and progress until it ends; exit code 0 only if it succeeded."""
    cursor, last = 0, None
    with store.connect(settings.home) as db:
        while True:
            row = store.get_run(db, run_id)
            for event in store.events(db, run_id, cursor):
                cursor = event["id"]
                print(event["message"], flush=True)
            shown = (round(100 * (row["progress"] or 0)), row["message"])
            if (
                row["status"] in (RunStatus.QUEUED, RunStatus.RUNNING)
                and shown != last
                and shown[1]
            ):
                last = shown
                print(f"[{shown[0]:3d}%] {shown[1]}", flush=True)
            if row["status"] in store.TERMINAL:
                break
            time.sleep(0.3)
    if row["status"] != RunStatus.SUCCEEDED:
        print(
            f"error: run {run_id} {row['status']}: {row['error'] or row['message']}",
            file=sys.stderr,
        )
        return 1
    with store.connect(settings.home) as db:
        for a in store.artifacts(db, run_id=run_id):
            print(f"artifact: {a['kind']} '{a['name']}' at {settings.home / a['path']}")
    return 0


def _absolute_paths(data: dict) -> dict:
    """Config values naming existing relative paths become absolute (the worker runs elsewhere)."""

    def fix(value):
        if (
            isinstance(value, str)
            and value
            and not Path(value).is_absolute()
            and Path(value).exists()
        ):
            return str(Path(value).resolve())
        if isinstance(value, list):
            return [fix(v) for v in value]
        return value

    return {k: fix(v) for k, v in data.items()}


if __name__ == "__main__":
    main()
