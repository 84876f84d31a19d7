"""`adaptflow`: run, grid, plan, promote, predict, probe, export, watch, serve, serve-model, demo, methods, models.

Exit codes: 0 ok, 2 the user's input is wrong, 1 anything else, 130 / 143 interrupted (SIGINT / SIGTERM).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import shlex
import sys
from collections.abc import Callable
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

from flows import process_tuning
from flows.startup import connect, session
from tasks.errors import UserInputError
from tasks.yaml_files import config_file_problem

log = logging.getLogger("adaptflow")
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "deployments" / "demo.yaml"


def _emit(result: dict[str, Any], args: argparse.Namespace, human: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Print for people unless --json (main prints the JSON line); return the result."""
    if not args.json:
        human(result)
    return result


def _run_config(
    config_path: str, overrides: list[str], resume: bool = False, allow_changed: bool = False, force: bool = False
) -> dict[str, Any]:
    from flows.finetune import run_method_flow
    from flows.pipeline import last_result, preflight
    from tasks.config import load_config

    config = load_config(config_path, overrides)
    preflight(config)
    connect(config.tracking, while_waiting=[_import_plotting])
    try:
        return run_method_flow(config, resume, allow_changed, force).model_dump()
    except Exception as exc:
        if not last_result:
            raise
        # The pipeline finished (registered, decided, MLflow run FINISHED); only Prefect's bookkeeping failed.
        # Reporting a failure would make a retrying script train again.
        result = last_result[-1]
        warning = (
            f"the run finished and its version is registered, but Prefect's orchestration was lost "
            f"({exc.__class__.__name__}: {str(exc)[:200]}): its flow-run state and events may be missing"
        )
        log.warning(warning)
        return result.model_copy(update={"warnings": [*result.warnings, warning]}).model_dump()


def _import_plotting() -> None:
    """What every run does anyway (its reports), done while Prefect's server starts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot


def _print_run(result: dict[str, Any]) -> None:
    metrics = result["metrics"]
    resumed = f"  (resumed from step {result['resumed_from_step']})" if result.get("resumed_from_step") else ""
    print(f"\nrun {result['run_id']}  method={result['method']}  task={result['task']}{resumed}")
    for key in sorted(metrics):
        print(f"  {key:28s} {metrics[key]:.6g}")
    aliases = ", ".join(f"@{a}" for a in result["aliases"]) or "no alias"
    print(f"registered {result['model_name']} version {result['model_version']} -> {aliases}")
    print(f"  ({result['promotion']})")
    probe = result["bias_probe"]
    base = probe.get("base") or {}
    if "pairs" in probe:
        before = base.get("pairs", {}).get("stereotype_score")
        shown = f"{before:.1f} -> " if before is not None else ""
        print(
            f"bias probe: stereotype score {shown}{probe['pairs']['stereotype_score']:.1f} (50 = no preference)", end=""
        )
        print(f", rule pass rate {probe['rules']['pass_rate']:.2f}" if "rules" in probe else "")
    if "robustness" in probe:
        print(f"robustness: consistency under perturbation {probe['robustness']['consistency']:.2f}")
    gate = probe.get("gate")
    if gate and not gate["passed"]:
        print(f"  BIAS GATE FAILED: {gate['reason']} -- kept out of @champion (tag bias_gate=failed)")
    print(f"  load it: mlflow.pyfunc.load_model('{result['model_uri']}')")
    for warning in result.get("warnings", []):
        print(f"  warning: {warning}")


def cmd_grid(args: argparse.Namespace) -> dict[str, Any]:
    from flows.grid import lora_grid
    from flows.pipeline import preflight
    from tasks.config import GridSettings, load_config

    config = load_config(args.config, args.set)
    if config.grid is None:
        config = config.model_copy(update={"grid": GridSettings()})
    preflight(config)
    connect(config.tracking, while_waiting=[_import_plotting])
    result = lora_grid(config, args.resume, _allow_changed(args)).model_dump()

    def human(r: dict[str, Any]) -> None:
        print(
            f"\ngrid {r['parent_run_id']}: {len(r['trials'])} trials, select {r['select']['metric']} ({r['select']['mode']})"
        )
        print(r["table"])
        print(f"best: trial {r['best']['index']} {r['best']['name']}")
        if r["steps_saved"]:
            print(f"steps trained: {r['steps_total']}; saved by pruning: {r['steps_saved']}")
        aliases = ", ".join(f"@{a}" for a in r["aliases"]) or "no alias"
        print(f"registered {r['model_name']} version {r['model_version']} -> {aliases}  ({r['promotion']})")

    return _emit(result, args, human)


def cmd_promote(args: argparse.Namespace) -> dict[str, Any]:
    from flows.promote import promote_newest
    from tasks.config import TrackingSettings

    connect(TrackingSettings())
    decision = promote_newest(args.name)
    result = {"command": "promote", "status": "ok", **decision.model_dump()}

    def human(r: dict[str, Any]) -> None:
        print(f"{r['name']} version {r['version']} -> @{r['alias']}  ({r['reason']})")
        print(f"champion: version {r['champion_version']}")

    return _emit(result, args, human)


def _allow_changed(args: argparse.Namespace) -> bool:
    """--allow-changed qualifies --resume alone."""
    if args.allow_changed and not args.resume:
        raise UserInputError("--allow-changed: only with --resume (it lets a resumed run continue on changed data)")
    return bool(args.allow_changed)


def cmd_run(args: argparse.Namespace) -> dict[str, Any]:
    result = _run_config(args.config, args.set, args.resume, _allow_changed(args), args.force)
    return _emit(result, args, _print_run)


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from tasks.config import TrackingSettings
    from tasks.tracking import tracking_uri

    print("adaptflow demo: LoRA on builtin:tiny with the bundled sample stories (embedded Prefect and MLflow)")
    result = _run_config(str(DEMO_CONFIG), args.set)
    _print_run(result)
    uri = tracking_uri(TrackingSettings())
    name = result["model_name"]
    champion = result["model_version"] if "champion" in result["aliases"] else "unchanged"
    print(
        f"\nchampion: {name}@champion = version {champion if champion != 'unchanged' else '(kept; this run is @challenger)'}"
    )
    bin_dir = Path(sys.executable).parent
    with contextlib.suppress(ValueError):
        bin_dir = bin_dir.relative_to(Path.cwd())
    print("next:")
    print(f"  {bin_dir / 'adaptflow'} predict models:/{name}@champion --text 'Once upon a time'")
    print(f"  {bin_dir / 'mlflow'} ui --backend-store-uri {uri}   # runs, metrics, artifacts, registry")
    print(f"  {bin_dir / 'prefect'} server start   # the Prefect UI; set PREFECT_API_URL to keep flow runs there")
    return result


def _conversation_arg(value: str) -> list[dict[str, str]]:
    """One --messages value: a JSON list of {"role", "content"} objects."""
    try:
        messages = json.loads(value)
    except json.JSONDecodeError as exc:
        raise UserInputError(f'--messages: not JSON ({exc}); expected \'[{{"role": "user", ...}}]\'') from None
    if not (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        raise UserInputError('--messages: expected a JSON list of {"role": ..., "content": ...} objects')
    roles = [m["role"] for m in messages]
    if unknown := sorted(set(roles) - {"system", "user", "assistant"}):
        raise UserInputError(f"--messages: unknown role(s) {unknown}; roles are system, user and assistant")
    if "user" not in roles:
        raise UserInputError(f"--messages: no user turn for the model to answer (roles: {roles})")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def cmd_predict(args: argparse.Namespace) -> dict[str, Any]:
    import mlflow

    from tasks.config import TrackingSettings

    texts = list(args.text or [])
    if args.input:
        path = Path(args.input)
        if not path.is_file():
            raise UserInputError(f"--input: file not found: {path}")
        texts += [line for line in path.read_text().splitlines() if line.strip()]
    conversations = [_conversation_arg(value) for value in args.messages or []]
    if not texts and not conversations:
        raise UserInputError(
            "predict: give --text TEXT (repeatable), --input FILE (one text per line) or --messages JSON (repeatable)"
        )
    connect(TrackingSettings())
    try:
        model = mlflow.pyfunc.load_model(args.model_uri)
    except Exception as exc:
        raise UserInputError(f"MODEL_URI: cannot load {args.model_uri!r}: {str(exc).splitlines()[0][:1000]}") from None
    if conversations and not getattr(model.unwrap_python_model(), "info", {}).get("chat"):
        raise UserInputError(f"--messages: {args.model_uri} is not an instruction model; give --text instead")
    # The pyfunc's own predict, with predict's length (the registered model's signature has no params schema)
    python_model = model.unwrap_python_model()
    params = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else None
    predictions = list(python_model.predict(None, texts, params)) if texts else []
    for conversation in conversations:  # one at a time: a list of messages is one conversation to the pyfunc
        predictions += list(python_model.predict(None, conversation, params))
    inputs: list[Any] = [*texts, *conversations]
    result = {"command": "predict", "model_uri": args.model_uri, "predictions": predictions}

    def human(r: dict[str, Any]) -> None:
        for number, (given, prediction) in enumerate(zip(inputs, r["predictions"], strict=True)):
            shown = given if isinstance(given, str) else given[-1]["content"]  # a conversation: its last turn
            print(("\n" if number else "") + f"> {shown}\n{prediction}")

    return _emit(result, args, human)


def cmd_probe(args: argparse.Namespace) -> dict[str, Any]:
    from tasks.config import TrackingSettings
    from tasks.probe.report import probe_standalone
    from tasks.settings import ProbeSettings

    connect(TrackingSettings() if args.model.startswith(("models:/", "runs:/")) else None)
    settings = ProbeSettings(suite=args.suite, samples=args.samples, max_new_tokens=args.max_new_tokens)
    data = Path(args.data) if args.data else None
    result, markdown = probe_standalone(args.model, args.suite, settings, data, args.text_column, args.label_column)
    return _emit(result, args, lambda r: print(markdown))


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from tasks.config import TrackingSettings
    from tasks.export import export_model, raise_if_unverified, result_of

    if args.model_uri and args.name:
        raise UserInputError("export: give MODEL_URI or --name (its champion), not both")
    if not args.model_uri and not args.name:
        raise UserInputError("export: give MODEL_URI (models:/NAME/VERSION or models:/NAME@ALIAS) or --name NAME")
    uri = args.model_uri or f"models:/{args.name}@champion"
    connect(TrackingSettings())
    records = export_model(uri, args.format, args.quant, Path(args.out), args.force)
    raise_if_unverified(uri, records)  # exit 1 with the JSON result: the artifacts and their verdicts are recorded
    result = result_of(uri, records)

    def human(r: dict[str, Any]) -> None:
        for e in r["exports"]:
            checks = e["checks"]
            diff = checks.get("max_abs_logit_diff")
            shown = f", max |logit diff| {diff:.3g}" if diff is not None else ""
            print(f"{e['format']} ({e['quant'] or '-'}) -> {e['path']}: {e['bytes'] / 1e6:.1f} MB, verified{shown}")
            for note in e["notes"]:
                print(f"  {note}")

    return _emit(result, args, human)


def cmd_watch(args: argparse.Namespace) -> dict[str, Any]:
    from flows.watch import watch

    changes = watch(Path(args.dir), once=args.once, interval=args.interval, settle_seconds=args.settle)
    result = {"command": "watch", "status": "ok", "dir": args.dir, "events": changes}

    def human(r: dict[str, Any]) -> None:
        print(f"{len(r['events'])} change(s) in {r['dir']}" + (": event emitted" if r["events"] else ""))

    return _emit(result, args, human)


def cmd_serve(args: argparse.Namespace) -> dict[str, Any]:
    from flows.serve import PREFECT_FILE, serve_all

    try:
        serve_all(Path(args.prefect_file) if args.prefect_file else PREFECT_FILE, limit=args.limit)
    except KeyboardInterrupt:  # Ctrl-C is how a server stops: not an error
        print("adaptflow serve: stopped", file=sys.stderr)
    return {"command": "serve", "status": "stopped"}


def cmd_serve_model(args: argparse.Namespace) -> dict[str, Any]:
    from adapters_impl.packaged import download_registered
    from tasks.config import TrackingSettings
    from tasks.openai_server import Engine, bind, serve, served_version

    if bool(args.model_uri) == bool(args.name):
        raise UserInputError("serve-model: give MODEL_URI (models:/NAME/VERSION, models:/NAME@ALIAS) or --name NAME")
    uri = args.model_uri or f"models:/{args.name}@champion"
    try:  # before the model loads: a port in use is named at once
        sock = bind(args.host, args.port)
    except OSError as exc:
        raise UserInputError(
            f"--host/--port: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}"
        ) from None
    connect(TrackingSettings())
    served = served_version(uri)
    try:
        packaged = download_registered(served.model_uri)
    except Exception as exc:
        raise UserInputError(f"MODEL_URI: cannot load {uri!r}: {str(exc).splitlines()[0][:1000]}") from None
    engine = Engine(packaged, served)
    result = {"command": "serve-model", "model_uri": served.model_uri, "model": served.model_id}

    def announce(url: str) -> None:
        print(
            f"adaptflow serve-model: {served.model_uri} ({engine.task}) as model {served.model_id!r} at {url} "
            f"(at most {engine.max_tokens} tokens and {engine.max_seconds:g} s per request)",
            file=sys.stderr,
            flush=True,
        )

    try:
        serve(engine, sock, announce)
    except KeyboardInterrupt:  # SIGTERM / Ctrl-C is how a server stops: not an error
        print("adaptflow serve-model: stopped", file=sys.stderr)
    return {**result, "status": "stopped", **engine.stats}


def cmd_plan(args: argparse.Namespace) -> dict[str, Any]:
    from tasks.config import load_config
    from tasks.distributed import check_device
    from tasks.memory import Device, gib, parse_bytes, plan, this_device
    from tasks.trials import expand_grid

    config = load_config(args.config, args.set)
    if config.model.registered:  # the base is a registered version: the registry says which
        from tasks.tracking import use_tracking

        use_tracking(config.tracking)
    device = this_device()
    if not args.device or args.device == device.kind:  # planned for this machine: what `run` would refuse here
        check_device(config.train)
    if args.device and args.device != device.kind:
        if not args.memory:
            raise UserInputError(
                f"--memory: required to plan for {args.device} on this machine (it has no {args.device})"
            )
        device = Device(args.device, f"{args.device} (planned)", parse_bytes(args.memory), bf16=args.device == "cuda")
    elif args.memory:
        device = Device(device.kind, f"{device.name} (planned)", parse_bytes(args.memory), device.bf16)
    result = plan(config, device)
    cells = []
    if config.grid is not None:
        for spec in expand_grid(config):
            cell = plan(spec.config, device, suggest=0)
            cells.append({"index": spec.index, "name": spec.name, "peak_bytes": cell.peak_bytes, "fits": cell.fits})

    def human(r: dict[str, Any]) -> None:
        print(
            f"{r['settings']['method']} on {config.model.name_or_path}: {r['parameters']:,} parameters, "
            f"{r['trainable']:,} trainable"
        )
        for key, value in r["footprint"].items():
            print(f"  {key:12s} {gib(value)}")
        print(
            f"  {'peak':12s} {gib(r['peak_bytes'])}"
            + (f" x {r['processes_on_device']} processes" if r["processes_on_device"] > 1 else "")
        )
        print(f"{'fits' if r['fits'] else 'does NOT fit'}: {gib(r['free_bytes'])} free on {r['device']}")
        for option in r["suggestions"]:
            print("  would fit: " + " ".join(f"--set {s}" for s in option))
        for cell in r["grid"]:
            print(
                f"  grid trial {cell['index']} {cell['name']}: {gib(cell['peak_bytes'])}"
                + ("" if cell["fits"] else "  (skipped: does not fit)")
            )

    return _emit({"command": "plan", "status": "ok", **result.model_dump(), "grid": cells}, args, human)


def cmd_methods(args: argparse.Namespace) -> dict[str, Any]:
    from adapters_impl import METHODS
    from tasks.objectives import OBJECTIVES, tasks_of

    listing = []
    for method in METHODS.values():
        settings = []
        for field, info in method.settings.model_fields.items():
            if field == "name":
                continue
            default = info.get_default(call_default_factory=True)
            settings.append({"key": f"method.{field}", "default": default, "help": info.description or ""})
        listing.append(
            {
                "name": method.name,
                "summary": method.summary,
                "flow": method.flow_name,
                "tasks": list(tasks_of(method)),
                "not_supported": dict(method.unsupported),
                "mergeable": method.mergeable,
                "settings": settings,
            }
        )

    objectives = [
        {"name": o.name, "summary": o.summary, "methods": [m.name for m in METHODS.values() if o.supports(m)]}
        for o in OBJECTIVES.values()
    ]

    def human(result: dict[str, Any]) -> None:
        for m in result["methods"]:
            print(f"{m['name']:8s} {m['summary']}")
            print(f"    flow {m['flow']}; tasks: {', '.join(m['tasks'])}; mergeable: {m['mergeable']}")
            width = max((len(json.dumps(s["default"])) for s in m["settings"]), default=0)
            for s in m["settings"]:  # key, default and help each in their own column
                print(f"    {s['key']:26s} {json.dumps(s['default']):{width}s}  {s['help']}")
        print("\ntasks (config task:)")
        for o in result["tasks"]:
            print(f"{o['name']:14s} {o['summary']}")
            print(f"    methods: {', '.join(o['methods'])}")

    return _emit({"command": "methods", "methods": listing, "tasks": objectives}, args, human)


def cmd_models(args: argparse.Namespace) -> dict[str, Any]:
    from tasks.modeling import builtin_model_path, builtin_models, builtin_names

    fetched = {}
    for name in args.fetch:
        if name not in builtin_names():
            raise UserInputError(f"--fetch: unknown builtin model {name!r}; available: {', '.join(builtin_names())}")
        fetched[name] = str(builtin_model_path(name.removeprefix("builtin:")))
    listing = [{**m, "path": fetched.get(m["name"])} for m in builtin_models()]

    def human(result: dict[str, Any]) -> None:
        for m in result["models"]:
            print(f"{m['name']:32s} {m['status']:40s} {m['summary']}")
            if m["path"]:
                print(f"    {m['path']}")

    return _emit({"command": "models", "status": "ok", "models": listing}, args, human)


ALLOW_CHANGED_HELP = (
    "with --resume: continue although the data, the base's weights or a template file changed since the run "
    "started (refused otherwise; the version records both)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaptflow", description=__doc__)
    parser.add_argument("--version", action="version", version=f"adaptflow {package_version('adaptflow')}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(
        name: str, handler: Callable[[argparse.Namespace], dict[str, Any]], help: str, runs_flows: bool = False
    ) -> argparse.ArgumentParser:
        """A subcommand; `runs_flows`: it runs Prefect flows (so Prefect's temporary server starts with it)."""
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler, runs_flows=runs_flows)
        p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
        return p

    overrides = {
        "action": "append",
        "default": [],
        "metavar": "KEY=VALUE",
        "help": "override a config key (YAML value)",
    }
    run = add("run", cmd_run, "one pipeline run of the configured method", runs_flows=True)
    run.add_argument("config", help="YAML config file")
    run.add_argument("--set", **overrides)  # type: ignore[arg-type]
    run.add_argument("--resume", action="store_true", help="continue the newest unfinished run of this config")
    run.add_argument("--allow-changed", action="store_true", help=ALLOW_CHANGED_HELP)
    run.add_argument(
        "--force", action="store_true", help="train and register even when this config was trained on the same data"
    )
    grid = add("grid", cmd_grid, "the comparison grid, then register and promote the best", runs_flows=True)
    grid.add_argument("config", help="YAML config file (its grid section; defaults when absent)")
    grid.add_argument("--set", **overrides)  # type: ignore[arg-type]
    grid.add_argument("--resume", action="store_true", help="continue the newest unfinished grid of this config")
    grid.add_argument("--allow-changed", action="store_true", help=ALLOW_CHANGED_HELP)
    plan = add("plan", cmd_plan, "estimate the run's peak memory (and each grid trial's) before training")
    plan.add_argument("config", help="YAML config file")
    plan.add_argument("--set", **overrides)  # type: ignore[arg-type]
    plan.add_argument(
        "--device", choices=["cpu", "cuda"], help="plan for this kind of device (default: this machine's)"
    )
    plan.add_argument("--memory", help="its free memory, e.g. 80GiB (default: what this machine's device has free)")
    promote = add("promote", cmd_promote, "champion/challenger decision for the newest version", runs_flows=True)
    promote.add_argument("--name", required=True, help="registered model name")
    predict = add("predict", cmd_predict, "generate or classify with a registered model")
    predict.add_argument("model_uri", help="models:/NAME@champion, models:/NAME/VERSION, runs:/... ")
    predict.add_argument("--text", action="append", help="input text (repeatable)")
    predict.add_argument(
        "--max-new-tokens", type=positive_int, help="longest answer (default: what the model was registered with)"
    )
    predict.add_argument("--input", help="a file with one input text per line")
    predict.add_argument(
        "--messages",
        action="append",
        help='a conversation for an instruction model, as JSON: \'[{"role": "user", "content": "..."}]\' (repeatable)',
    )
    probe = add("probe", cmd_probe, "the bias and robustness probe alone on a model")
    probe.add_argument("model", help="local model folder, .gguf file, builtin:NAME, hub id, or models:/NAME@ALIAS")
    probe.add_argument(
        "--suite",
        default="default",
        help="builtin suite name (default: default) or a path: YAML suite, pairs CSV/JSONL, WinoBias folder",
    )
    probe.add_argument("--data", help="labelled texts for the robustness check of a classifier")
    probe.add_argument("--text-column", default="text")
    probe.add_argument("--label-column", default="label")
    probe.add_argument("--samples", type=int, default=1, help="generations per rule prompt (1 = greedy)")
    probe.add_argument("--max-new-tokens", type=int, default=20)
    export = add("export", cmd_export, "write a registered version in a serving format, verified against it")
    export.add_argument(
        "model_uri", nargs="?", help="models:/NAME/VERSION or models:/NAME@ALIAS (default: --name's champion)"
    )
    export.add_argument("--name", help="registered model name: export its @champion")
    export.add_argument(
        "--format",
        required=True,
        action="append",
        choices=["hf-merged", "gguf", "gguf-lora", "ollama", "ollama-lora", "vllm-check"],
        help="serving format (repeatable: each to its own subfolder of --out)",
    )
    export.add_argument(
        "--quant", choices=["f32", "f16", "bf16", "q8_0"], help="weight type (default: f16 for GGUF, f32 for hf-merged)"
    )
    export.add_argument("--out", required=True, help="the folder to write (must be empty or absent unless --force)")
    export.add_argument("--force", action="store_true", help="replace a non-empty --out")
    watch = add("watch", cmd_watch, "fingerprint a data folder; emit a Prefect event when it changes")
    watch.add_argument("dir", help="the data folder to watch")
    watch.add_argument("--once", action="store_true", help="check once and exit")
    watch.add_argument("--interval", type=float, default=10.0, help="seconds between checks")
    watch.add_argument("--settle", type=float, default=1.0, help="seconds the folder must stay unchanged first")
    serve = add("serve", cmd_serve, "serve the deployments (schedules and triggers) against the Prefect API")
    serve.add_argument("--prefect-file", help="a prefect.yaml (default: deployments/prefect.yaml)")
    serve.add_argument("--limit", type=int, help="flow runs at once")
    serve_model = add(
        "serve-model",
        cmd_serve_model,
        "serve a registered version over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
        "/v1/models) until SIGTERM or Ctrl-C",
    )
    serve_model.add_argument("model_uri", nargs="?", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    serve_model.add_argument("--name", help="registered model name: serve its @champion")
    serve_model.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve_model.add_argument("--port", type=port_number, default=8000, help="port (default: 8000; 0: any free one)")
    demo = add("demo", cmd_demo, "the offline demo on embedded defaults", runs_flows=True)
    demo.add_argument("--set", **overrides)  # type: ignore[arg-type]
    add("methods", cmd_methods, "list the methods and their settings")
    models = add("models", cmd_models, "list the builtin models and whether each is cached")
    models.add_argument(
        "--fetch", action="append", default=[], metavar="NAME", help="obtain a builtin model now (repeatable)"
    )
    return parser


def positive_int(text: str) -> int:
    """An argparse type: a whole number above 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {value}")
    return value


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free one) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {value}")
    return value


def resume_command(args: argparse.Namespace) -> str:
    """The interrupted command line as typed, its --set overrides included (they are part of what is resumed),
    with --resume."""
    words = ["adaptflow", args.command, args.config]
    for override in args.set:
        words += ["--set", override]
    words.append("--resume")
    return " ".join(shlex.quote(w) for w in words)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 bad input, 1 anything else, 128 + signal if interrupted)."""
    args = build_parser().parse_args(argv)
    hint = ""
    if args.command in ("run", "grid"):
        hint = f"; the run is marked KILLED: `{resume_command(args)}` continues it"
    problem = config_problem(args)
    with session(
        args.command, runs_flows=args.runs_flows and not problem, json_output=args.json, resume_hint=hint
    ) as outcome:
        if problem:
            raise problem
        outcome.result = args.handler(args)
    return outcome.code


def config_problem(args: argparse.Namespace) -> UserInputError | None:
    """What is wrong with the command's config file, named at once, before a server starts or torch is imported:
    missing, unreadable, not YAML, or (with its --set overrides) an unknown key or a bad value. The config's schema
    imports neither (the methods' and objectives' settings live apart from their implementations)."""
    path = getattr(args, "config", None)
    if not isinstance(path, str):
        return None
    problem = config_file_problem(Path(path))
    if problem:
        return UserInputError(problem)
    from tasks.config import load_config

    process_tuning.tune_process()  # first: `train.optim` is checked against transformers' names (imports torch)
    try:
        load_config(path, getattr(args, "set", []))
    except UserInputError as exc:
        return exc
    return None


def entry() -> None:
    """The `adaptflow` command: `main`, its exit handlers, then an immediate exit.

    Finalizing an interpreter that has loaded torch, transformers, MLflow and Prefect takes ~3 s and does
    nothing a finished command needs; the exit handlers (Prefect's log and event flush, logging's flush, the
    temporary server's stop) have all run by then. `main` starts the command the one way (`flows.startup`).
    """
    code = main()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
