"""The `edgecow` command: argument parsing lives here and only here.

    edgecow serve --model-repository ./models --listen 0.0.0.0:8001
    edgecow infer identity --input x=x.npy --output-dir out/

Client subcommands (infer, status, doctor, models list) and install-systemd need only the light client; serve,
models import and models list --model-repository load the server's modules when they run, and without
the [server] extra say in one line what to install.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from edge_server import __version__
from shm_client.shared.errors import EdgecowError

if TYPE_CHECKING:
    from shm_client import EdgeClient

# The top-level modules of the packages only the [server] extra installs.
SERVER_ONLY_MODULES = frozenset(
    {"onnxruntime", "psutil", "grpc_health", "grpc_reflection", "prometheus_client", "tomli"}
)

# Help for the flags whose default --help shows in words, not as one value.
_EXTRA_HELP = {
    "max_request_bytes": "default: 2 GiB - 1",
    "max_tensor_bytes": "default: 2 GiB - 1",
    "shm_max_mapped_bytes": "default: 32 GiB",
    "lane_max_buffered_bytes": "default: 256 MiB",
}


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, from the settings table in edge_server/config.py."""
    from .config import settings_table

    for row in settings_table():
        text = f"{row.help} (default: {row.default}; ${row.env})".replace("%", "%%")
        if row.name in _EXTRA_HELP:
            text = f"{row.help} ({_EXTRA_HELP[row.name]}; ${row.env})"
        if row.kind == "bool":
            parser.add_argument(row.flag, dest=row.name, action="store_const", const=row.default != "true",
                                default=None, help=text)
        else:
            kind = {"int": int, "float": float}.get(row.kind, str)
            parser.add_argument(row.flag, dest=row.name, type=kind, metavar=row.name.upper(), help=text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgecow",
        description="edgecow: a shared-memory inference server for ONNX models (KServe v2 gRPC).",
    )
    parser.add_argument("--version", action="version", version=f"edgecow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the server", description="Load the models and serve them.")
    serve.add_argument("--config", type=Path, help="TOML settings file (keys as the flags, with underscores)")
    _add_setting_flags(serve)

    target_help = "server address: unix:///path or HOST:PORT (default: $EDGECOW_TARGET or the local socket)"
    infer = sub.add_parser("infer", help="run one inference from .npy files")
    infer.add_argument("model")
    infer.add_argument("--input", "-i", action="append", default=[], metavar="NAME=FILE.npy", required=True,
                       help="an input tensor; repeat for each input")
    infer.add_argument("--output", "-o", action="append", default=None, metavar="NAME",
                       help="an output to return (default: all)")
    infer.add_argument("--model-version", default=None, help="model version (default: highest)")
    infer.add_argument("--output-dir", type=Path, help="write each output as NAME.npy here")
    infer.add_argument("--target", help=target_help)
    infer.add_argument("--transport", choices=("auto", "shm", "grpc"), default="auto")

    status = sub.add_parser("status", help="show the server, its models, providers and resources")
    status.add_argument("--target", help=target_help)
    status.add_argument("--json", action="store_true", help="print JSON")

    doctor = sub.add_parser("doctor", help="check that this process can use shared memory with the server",
                            description="One line per check (ok, warn or FAIL) with what to run; exit code 0 "
                                        "only when shared memory works.")
    doctor.add_argument("--target", help=target_help)

    models = sub.add_parser("models", help="list, import, load or unload models")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    listing = models_sub.add_parser("list", help="models, versions, inputs/outputs and state")
    listing.add_argument("--target", help=target_help)
    listing.add_argument("--model-repository", type=Path,
                         help="inspect this directory instead of asking a running server")
    listing.add_argument("--json", action="store_true", help="print JSON")
    for action, text in (("load", "load a model, or reload it from disk, on the running server"),
                         ("unload", "unload a model on the running server")):
        control = models_sub.add_parser(action, help=text,
                                        description=f"{text[0].upper()}{text[1:]} (local callers only).")
        control.add_argument("model")
        control.add_argument("--target", help=target_help)

    reload = sub.add_parser("reload", help="have the running server rescan its repository, as SIGHUP does",
                            description="Loaded models follow their files, new models load (when the server "
                                        "serves every model), removed ones unload. Local callers only.")
    reload.add_argument("--target", help=target_help)

    importing = models_sub.add_parser("import", help="validate an ONNX file and add it as the next version")
    importing.add_argument("file", type=Path)
    importing.add_argument("--name", required=True, help="model name")
    importing.add_argument("--version", type=int, help="version number (default: one past the highest)")
    importing.add_argument("--model-repository", type=Path, help="repository root (default: from settings)")
    importing.add_argument("--config", type=Path, help="TOML settings file to read the repository from")

    install = sub.add_parser("install-systemd", help="install edgecow as a systemd service")
    install.add_argument("--root", type=Path, default=Path("/"), help="stage into this directory (default: /)")
    install.add_argument("--dry-run", action="store_true", help="show what would change, change nothing")
    install.add_argument("--gpu", action="store_true", help="add the drop-in that lets the service see NVIDIA GPUs")
    install.add_argument("--force", action="store_true",
                         help="install even when the unit's sandbox hides this interpreter (under /tmp, /home "
                              "or /root)")
    uninstall = sub.add_parser(
        "uninstall-systemd", help="remove what install-systemd installed",
        description="Stop and disable the service, remove its unit, drop-ins and sysusers/tmpfiles snippets; "
                    "the config in /etc/edgecow, the models and the edgecow user stay.",
    )
    uninstall.add_argument("--root", type=Path, default=Path("/"),
                           help="remove from this staging directory instead of the live system (default: /)")
    uninstall.add_argument("--dry-run", action="store_true", help="show what would be removed, remove nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {
        "serve": _serve,
        "infer": _infer,
        "status": _status,
        "doctor": _doctor,
        "models": _models,
        "reload": _reload,
        "install-systemd": _install,
        "uninstall-systemd": _uninstall,
    }
    try:
        return handlers[args.command](args)
    except EdgecowError as err:
        print(f"edgecow: error: {err.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`edgecow models list | head`): stop quietly, as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


@contextlib.contextmanager
def _server_modules(command: str) -> Iterator[None]:
    """Around a server command's imports: without the [server] extra, one line says what to install."""
    try:
        yield
    except ModuleNotFoundError as err:
        if (err.name or "").partition(".")[0] not in SERVER_ONLY_MODULES:
            raise
        raise EdgecowError(f"'edgecow {command}' needs the server's packages ({err.name} is not installed): "
                           "pip install 'edgecow[server]'") from None


def _serve(args: argparse.Namespace) -> int:
    with _server_modules("serve"):
        from .config import load_settings, settings_table
        from .server import serve

    overrides: dict[str, Any] = {row.name: getattr(args, row.name) for row in settings_table()}
    settings = load_settings(args.config, overrides)
    code = serve(settings, args.config)
    # The server has released everything it owns (segments, sockets, listeners). Skip the interpreter's
    # teardown, where collecting each onnxruntime session joins its thread pool one model at a time (a
    # third of a second for twenty models), so a stop or restart is not held up by it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _client(args: argparse.Namespace, transport: str = "grpc") -> EdgeClient:
    from shm_client import EdgeClient

    return EdgeClient(args.target, transport=transport, timeout=30.0)


def _infer(args: argparse.Namespace) -> int:
    inputs = {}
    for item in args.input:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise EdgecowError(f"--input {item!r} is not NAME=FILE.npy")
        try:
            inputs[name] = np.load(file, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise EdgecowError(f"cannot read {file} as a .npy file: {err}") from None
    with _client(args, args.transport) as client:
        outputs = client.infer(args.model, inputs, outputs=args.output, version=args.model_version)
        transport = client.transport
    for name, array in outputs.items():
        if args.output_dir:
            args.output_dir.mkdir(parents=True, exist_ok=True)
            path = args.output_dir / f"{name}.npy"
            np.save(path, array, allow_pickle=array.dtype == object)
            print(f"{name}: {array.dtype}{list(array.shape)} -> {path}")
        else:
            print(f"{name}: {array.dtype}{list(array.shape)}")
            print(np.array2string(array, threshold=20))
    print(f"(transport: {transport})", file=sys.stderr)
    return 0


def _message_as_json(message: Message) -> dict[str, Any]:
    """A message as JSON data with every field present (zero counts as 0) and 64-bit integers as numbers,
    which protobuf's JSON mapping writes as strings."""
    from google.protobuf import json_format

    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _int64_as_numbers(cast(Descriptor, message.DESCRIPTOR), data)  # the C and Python classes alike


_INT64_TYPES = frozenset({
    FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64,
})


def _int64_as_numbers(descriptor: Descriptor, data: dict[str, Any]) -> dict[str, Any]:
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry = field.message_type.fields_by_name["value"]
            data[field.name] = {key: _json_value(entry, item) for key, item in value.items()}
        elif isinstance(value, list):
            data[field.name] = [_json_value(field, item) for item in value]
        else:
            data[field.name] = _json_value(field, value)
    return data


def _json_value(field: FieldDescriptor, value: Any) -> Any:
    if field.message_type is not None and isinstance(value, dict):
        return _int64_as_numbers(field.message_type, value)
    if field.type in _INT64_TYPES:
        return int(value)
    return value


def _status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.status()
    if args.json:
        print(json.dumps(_message_as_json(status), indent=2))
        return 0
    mib = 1 << 20
    print(f"edgecow {status.version} pid {status.process.pid}, up {status.process.uptime_seconds:.0f}s")
    print(f"  listening:  {', '.join(status.listeners)}")
    print(f"  providers:  {', '.join(status.available_providers)} (usable on this machine)")
    shm = "on" if status.shared_memory_enabled else "off"
    print(f"  shm:        {shm}, {status.registered_regions} region(s), {status.mapped_bytes / mib:.1f} MiB mapped")
    proc, system = status.process, status.system
    print(f"  process:    RSS {proc.rss_bytes / mib:.1f} MiB, CPU {proc.cpu_percent:.0f}%, "
          f"{proc.threads} threads, {proc.open_files} fds")
    print(f"  system:     memory {system.memory_available_bytes / mib:.0f}/{system.memory_total_bytes / mib:.0f} "
          f"MiB free, /dev/shm {system.shm_free_bytes / mib:.0f}/{system.shm_total_bytes / mib:.0f} MiB free, "
          f"load {system.load_average_1m:.2f}")
    print(f"  models:     {len(status.models)} version(s) loaded")
    for model in status.models:
        print(f"    {model.name}:{model.version}  on {', '.join(model.providers)}  "
              f"{model.inference_count} call(s), {model.in_flight} in flight")
    return 0


def _models(args: argparse.Namespace) -> int:
    if args.models_command in ("load", "unload"):
        return _models_control(args)
    return _models_import(args) if args.models_command == "import" else _models_list(args)


def _models_control(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.models_command == "load":
            client.load_model(args.model)
        else:
            client.unload_model(args.model)
        rows = [row for row in client.models() if row["name"] == args.model]
    states = ", ".join(f"v{row['version'] or '-'} {row['state']}" for row in rows) or "not in the repository"
    print(f"{args.models_command}ed {args.model}: {states}")
    return 0


def _reload(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(f"reloaded: {client.reload_repository()}")
    return 0


def _models_list(args: argparse.Namespace) -> int:
    rows = _offline_models(args.model_repository) if args.model_repository else _server_models(args)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no models")
    for row in rows:
        line = f"{row['name']:<24} v{row['version'] or '-':<4} {row['state']:<12}"
        if row.get("reason"):
            line += f" {row['reason']}"
        print(line.rstrip())
        for kind in ("inputs", "outputs"):
            for tensor in row.get(kind, []):
                print(f"    {kind[:-1]:<6} {tensor['name']:<20} {tensor['datatype']:<6} {tensor['shape']}")
    return 0


def _server_models(args: argparse.Namespace) -> list[dict[str, Any]]:
    with _client(args) as client:
        rows: list[dict[str, Any]] = client.models()
        for row in rows:
            if row["state"] == "READY":
                meta = client.metadata(row["name"], row["version"] or None)
                row["inputs"], row["outputs"] = meta["inputs"], meta["outputs"]
    return rows


def _offline_models(root: Path) -> list[dict[str, Any]]:
    with _server_modules("models list --model-repository"):
        from .config import Settings
        from .repository import ModelStore, Repository

        # The store imports the runtime only when it loads a model, and would list a missing onnxruntime
        # as a model that failed to load.
        importlib.import_module(".runtime", __package__)

    store = ModelStore(Repository(root), Settings(model_repository=root))
    store.load_all()
    rows = []
    loaded = {(m.name, m.version): m for m in store.loaded()}
    for state in store.index():
        row: dict[str, Any] = {"name": state.name, "version": str(state.version or ""), "state": state.state,
                               "reason": state.reason}
        model = loaded.get((state.name, state.version))
        if model is not None:
            row["inputs"] = [{"name": s.name, "datatype": s.datatype.name, "shape": list(s.shape)}
                             for s in model.inputs]
            row["outputs"] = [{"name": s.name, "datatype": s.datatype.name, "shape": list(s.shape)}
                              for s in model.outputs]
        rows.append(row)
    return rows


def _models_import(args: argparse.Namespace) -> int:
    with _server_modules("models import"):
        from .config import load_settings
        from .repository import NAME_PATTERN, ModelConfigFile, Repository, import_sources
        from .runtime import ModelOptions, ModelRuntime

    root = args.model_repository or load_settings(args.config).model_repository
    if not args.file.is_file():
        raise EdgecowError(f"{args.file} does not exist")
    repository = Repository(root)
    version = args.version or (repository.latest_version(args.name) or 0) + 1
    try:
        data_files = import_sources(args.file)  # checked before onnxruntime opens any of them
        # The model's config.toml, when it has one already, holds what the new version must load with:
        # its custom-operator libraries, batch size and labels.
        config = repository.config(args.name) if NAME_PATTERN.match(args.name) else ModelConfigFile()
        options = ModelOptions(
            providers=("CPUExecutionProvider",), model_dir=repository.root / args.name,
            max_batch_size=config.max_batch_size, labels=config.labels,
            custom_op_libraries=config.custom_op_libraries, onnxruntime_extensions=config.onnxruntime_extensions,
        )
        model = ModelRuntime.load(args.name, version, args.file, options)
    except EdgecowError as err:
        raise EdgecowError(f"{args.file} cannot be imported: {err.message}") from None
    target = repository.import_model(args.file, args.name, version)
    print(f"imported {args.file} as {args.name} version {target.parent.name} -> {target}")
    for location in data_files:
        print(f"    external data {location}")
    for spec in model.inputs:
        print(f"    input  {spec.name:<20} {spec.datatype.name:<6} {list(spec.shape)}")
    for spec in model.outputs:
        print(f"    output {spec.name:<20} {spec.datatype.name:<6} {list(spec.shape)}")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from shm_client import doctor

    return doctor.run(args.target)


def _install(args: argparse.Namespace) -> int:
    from . import install

    if not args.force:
        install.check_visible_to_service()
    for change in install.install(args.root, dry_run=args.dry_run, gpu=args.gpu):
        print(f"{change.action:9} {change.path}")
    _print_skipped(install.not_live_reason(args.root), install.install_steps())
    return 0


def _print_skipped(reason: str | None, steps: list[str]) -> None:
    """Say which live-system steps a staging (or unprivileged) run left out, and that they are still due."""
    if reason is None:
        return
    for step in steps:
        print(f"{'skipped':9} {step} ({reason}; run it on the target system)")


def _uninstall(args: argparse.Namespace) -> int:
    from . import install

    for change in install.uninstall(args.root, dry_run=args.dry_run):
        print(f"{change.action:9} {change.path}")
    _print_skipped(install.not_live_reason(args.root), install.uninstall_steps())
    return 0
