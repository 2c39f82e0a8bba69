"""The model repository on disk and the set of model versions loaded from it.

    store = ModelStore(Repository(Path("models")), settings); store.load_all()
    model = store.get("scale", version="")        # highest loaded version, a ModelRuntime

Layout: <root>/<name>/<version>/model.onnx, versions are positive integers, plus an optional
<root>/<name>/config.toml (providers, threads, version policy, warmup, require_gpu). A swap is atomic:
a call holds the ModelRuntime it started with, so it finishes on the old session.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from shm_client.shared.errors import EdgecowError, InvalidArgument, NotFound, Unavailable

from .batching import MAX_BATCH_SIZE_LIMIT
from .config import ConfigError, Settings, read_toml
from .external_data import external_files

if TYPE_CHECKING:  # runtime imports onnxruntime, which reading a repository does not need
    from .runtime import ModelRuntime

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.toml"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MAX_SUGGESTED_NAME = 128  # the longest name NAME_PATTERN allows
# A version is written in ASCII digits without a leading zero: str.isdigit() also passes superscripts,
# circled and Arabic-Indic digits, and '01' would name version 1 a second way. 18 digits keep it inside int64.
VERSION_PATTERN = re.compile(r"[1-9][0-9]{0,17}")


def parse_version(text: str) -> int | None:
    """The version `text` names, or None when it is not a canonical positive integer."""
    return int(text) if VERSION_PATTERN.fullmatch(text) else None


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions on disk to serve: the latest N, all, or a fixed list."""

    kind: str = "latest"  # "latest" | "all" | "specific"
    count: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: list[int]) -> list[int]:
        ordered = sorted(available)
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered[-self.count :]


@dataclass(frozen=True)
class ModelConfigFile:
    """The contents of <root>/<name>/config.toml."""

    providers: tuple[str, ...] | None = None
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    intra_op_spinning: bool | None = None  # None: the server's setting
    version_policy: VersionPolicy = VersionPolicy()
    warmup: bool = False
    require_gpu: bool | None = None
    max_batch_size: int | None = None  # None: detected from the model's shapes
    labels: tuple[tuple[str, str], ...] = ()  # (output, file); output "" is every output
    custom_op_libraries: tuple[str, ...] = ()
    onnxruntime_extensions: bool | None = None  # None: when the model imports ai.onnx.contrib


_CONFIG_KEYS = {
    "providers", "intra_op_threads", "inter_op_threads", "intra_op_spinning", "version_policy", "warmup",
    "require_gpu",
    "max_batch_size", "labels", "custom_op_libraries", "onnxruntime_extensions",
}


def _policy(value: Any, path: Path) -> VersionPolicy:
    if value == "all":
        return VersionPolicy("all")
    if isinstance(value, dict) and len(value) == 1:
        ((key, arg),) = value.items()
        if key == "latest" and isinstance(arg, int) and not isinstance(arg, bool) and arg >= 1:
            return VersionPolicy("latest", arg)
        if key == "all" and arg is True:
            return VersionPolicy("all")
        if key == "specific" and isinstance(arg, list) and arg and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in arg
        ):
            return VersionPolicy("specific", versions=tuple(arg))
    raise ConfigError(
        f"{path}: version_policy must be \"all\", {{ latest = N }} or {{ specific = [1, 2] }}, not {value!r}"
    )


def parse_model_config(path: Path, label: str | None = None) -> ModelConfigFile:
    """Read a model's config.toml; a ConfigError naming the file (as `label`) says what is wrong."""
    data = read_toml(path, label)
    path = Path(label) if label else path
    unknown = set(data) - _CONFIG_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key {sorted(unknown)[0]!r}; known keys: {', '.join(sorted(_CONFIG_KEYS))}")
    kwargs: dict[str, Any] = {}
    if "providers" in data:
        providers = data["providers"]
        if not isinstance(providers, list) or not all(isinstance(p, str) for p in providers) or not providers:
            raise ConfigError(f"{path}: providers must be a list of names such as [\"CUDAExecutionProvider\"]")
        kwargs["providers"] = tuple(providers)
    for key in ("intra_op_threads", "inter_op_threads"):
        if key in data:
            if not isinstance(data[key], int) or isinstance(data[key], bool) or data[key] < 0:
                raise ConfigError(f"{path}: {key} must be a non-negative integer")
            kwargs[key] = data[key]
    for key in ("warmup", "require_gpu", "intra_op_spinning"):
        if key in data:
            if not isinstance(data[key], bool):
                raise ConfigError(f"{path}: {key} must be true or false")
            kwargs[key] = data[key]
    if "version_policy" in data:
        kwargs["version_policy"] = _policy(data["version_policy"], path)
    kwargs.update(_extension_keys(data, path))
    return ModelConfigFile(**kwargs)


def _extension_keys(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """Batching, classification labels and custom operators (each optional)."""
    kwargs: dict[str, Any] = {}
    if "max_batch_size" in data:
        value = data["max_batch_size"]
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_BATCH_SIZE_LIMIT:
            raise ConfigError(f"{path}: max_batch_size must be an integer from 0 (no batching) to "
                              f"{MAX_BATCH_SIZE_LIMIT}, not {value!r}")
        kwargs["max_batch_size"] = value
    if "labels" in data:
        value = data["labels"]
        if isinstance(value, str):
            kwargs["labels"] = (("", _model_file(value, "labels", path)),)
        elif isinstance(value, dict) and value and all(isinstance(v, str) for v in value.values()):
            kwargs["labels"] = tuple((output, _model_file(file, "labels", path)) for output, file in value.items())
        else:
            raise ConfigError(f"{path}: labels must be a file name such as \"labels.txt\" or a table of output "
                              f"names to file names such as {{ probabilities = \"labels.txt\" }}, not {value!r}")
    if "custom_op_libraries" in data:
        value = data["custom_op_libraries"]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{path}: custom_op_libraries must be a list of file names such as [\"libmyops.so\"]")
        kwargs["custom_op_libraries"] = tuple(_model_file(v, "custom_op_libraries", path) for v in value)
    if "onnxruntime_extensions" in data:
        if not isinstance(data["onnxruntime_extensions"], bool):
            raise ConfigError(f"{path}: onnxruntime_extensions must be true or false (leave it out to decide by the "
                              "model's operators)")
        kwargs["onnxruntime_extensions"] = data["onnxruntime_extensions"]
    return kwargs


def _model_file(name: str, key: str, path: Path) -> str:
    """`name` as config.toml gave it, once it is known to stay inside the model's directory: relative,
    and no '..' that climbs out of it (a symlink placed there may point anywhere: its owner put it there)."""
    parts = PurePosixPath(name).parts
    depth = 0
    for part in parts:
        depth += -1 if part == ".." else 0 if part == "." else 1
        if depth < 0:
            break
    if not name or "\0" in name or PurePosixPath(name).is_absolute() or depth <= 0:
        raise ConfigError(f"{path}: {key} names {name!r}, which is not a file inside the model's directory; give a "
                          "path relative to the directory that holds config.toml, without '..' out of it")
    return name


class Repository:
    """Read-only view of <root>: which models and versions are on disk."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        # model.onnx path -> (its inode, mtime and size; its external-data names; why they are refused):
        # polling reads a model file again only when it changed.
        self._external: dict[Path, tuple[tuple[int, int, int], tuple[str, ...], str]] = {}

    def model_names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and NAME_PATTERN.match(p.name))

    def versions(self, name: str) -> list[int]:
        """Positive integer versions of `name` that hold a model.onnx."""
        model_dir = self.root / name
        if not model_dir.is_dir():
            return []
        found = []
        for entry in model_dir.iterdir():
            version = parse_version(entry.name)
            if version is not None and (entry / MODEL_FILE).is_file():
                found.append(version)
        return sorted(found)

    def latest_version(self, name: str) -> int | None:
        versions = self.versions(name)
        return versions[-1] if versions else None

    def model_path(self, name: str, version: int) -> Path:
        return self.root / name / str(version) / MODEL_FILE

    def config(self, name: str) -> ModelConfigFile:
        path = self.root / name / CONFIG_FILE
        # Errors name the file relative to the repository: callers should not learn the server's paths.
        return parse_model_config(path, f"{name}/{CONFIG_FILE}") if path.is_file() else ModelConfigFile()

    def fingerprint(self, name: str, version: int) -> tuple[Any, ...]:
        """Changes when model.onnx or one of the external-data files it names is replaced, rewritten,
        appears or goes, so polling reloads that version."""
        path = self.model_path(name, version)
        stat = path.stat()
        prints: list[Any] = [(stat.st_mtime_ns, stat.st_size)]
        try:
            names = self.external_files(name, version)
        except Unavailable:
            names = ()  # refused when the version loads
        for location in names:
            try:
                data = (path.parent / location).stat()
                prints.append((location, data.st_mtime_ns, data.st_size))
            except OSError:
                prints.append((location, None))
        return tuple(prints)

    def external_files(self, name: str, version: int) -> tuple[str, ...]:
        """The external-data files a version's model.onnx names, relative to its directory;
        Unavailable (the version cannot load) when one would lie outside it."""
        path = self.model_path(name, version)
        try:
            stat = path.stat()
        except OSError:
            return ()  # gone meanwhile: loading it says so
        key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        cached = self._external.get(path)
        if cached is None or cached[0] != key:
            try:
                cached = (key, external_files(path), "")
            except InvalidArgument as err:
                cached = (key, (), err.message)
            self._external[path] = cached
        if cached[2]:
            raise Unavailable(f"model {name} version {version} cannot be loaded: {cached[2]}")
        return cached[1]

    def import_model(self, source: Path, name: str, version: int | None = None) -> Path:
        """Copy a validated ONNX file, and the external-data files it names, in as `version` (default: one
        past the highest) and return the new model.onnx."""
        if not NAME_PATTERN.match(name):
            raise InvalidArgument(
                f"model name {name!r} is not allowed; use letters, digits, '_', '-' or '.', at most 128 characters"
            )
        if version is None:
            version = (self.latest_version(name) or 0) + 1
        if version < 1:
            raise InvalidArgument(f"version {version} is not allowed; versions are positive integers")
        target = self.model_path(name, version)
        if target.exists():
            raise InvalidArgument(f"model {name} version {version} already exists; choose another --version")
        data_files = import_sources(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Each file lands by an atomic rename, model.onnx last: a polling server sees the version (a directory
        # holding model.onnx) only once it is whole.
        for location in data_files:
            _copy_whole(source.parent / location, target.parent / location)
        _copy_whole(source, target)
        return target


def import_sources(source: Path) -> tuple[str, ...]:
    """The external-data files the ONNX file `source` names, checked before an import copies them: inside
    its directory (no absolute name, no '..' out of it, no symbolic link leading out), present, and not
    in the place model.onnx will take."""
    names = external_files(source)
    base = source.parent.resolve()
    for location in names:
        if os.path.normpath(location) == MODEL_FILE:
            raise InvalidArgument(
                f"the model keeps external data in a file named {MODEL_FILE!r}, the name the model itself takes "
                "in the repository; save the data under another name"
            )
        path = (source.parent / location).resolve()
        if not path.is_relative_to(base):
            raise InvalidArgument(
                f"the model's external data {location!r} is a symbolic link that leads outside the model's "
                "directory; put the file itself beside the model"
            )
        if not path.is_file():
            raise InvalidArgument(
                f"the model names external data {location!r}, which is not beside it; put that file in "
                f"{source.name}'s directory"
            )
    return names


def _copy_whole(source: Path, target: Path) -> None:
    """Copy `source` to `target` through a neighbouring .partial file and an atomic rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        shutil.copyfile(source, partial)
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


@dataclass
class ModelState:
    """What RepositoryIndex reports for one model version."""

    name: str
    version: int
    state: str  # READY | UNAVAILABLE | UNLOADED
    reason: str = ""


@dataclass
class _Entry:
    versions: dict[int, ModelRuntime] = field(default_factory=dict)
    fingerprints: dict[int, tuple[Any, ...]] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    error: str = ""  # a model-level problem, e.g. a broken config.toml


# Loads one version: (name, version, its model.onnx, the model's config.toml, settings) -> the runtime.
Loader = Callable[[str, int, Path, ModelConfigFile, Settings], "ModelRuntime"]


class ModelStore:
    """The loaded models. Reads are lock-free snapshots; loads and unloads serialise on one lock.

    Writers never change the published dict: they build a new one and swap the reference, so a reader
    that took `self._entries` once can iterate it while a load or unload runs.
    """

    def __init__(
        self,
        repository: Repository,
        settings: Settings,
        loader: Loader | None = None,
    ) -> None:
        self.repository = repository
        self.settings = settings
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._loader = loader or _default_loader
        self.generation = 0  # bumps on every change, for status lines

    # -- reading -----------------------------------------------------------------------------------
    def get(self, name: str, version: str = "") -> ModelRuntime:
        """The ModelRuntime for `name` at `version` ("" = highest loaded); NOT_FOUND says what exists."""
        entry = self._entries.get(name)
        if entry is None or not entry.versions:
            reason = ""
            if entry is not None:
                reason = entry.error or next(iter(entry.failures.values()), "")
            if reason:
                raise Unavailable(f"model {name!r} is not available: {reason}")
            raise NotFound(f"model {name!r} is not loaded; {self._suggest(name)}")
        versions = entry.versions
        if not version:
            return versions[max(versions)]
        number = parse_version(version)
        if number is None:
            raise InvalidArgument(
                f"model version {version[:32]!r} is not a positive integer in ASCII digits without leading zeros"
            )
        model = versions.get(number)
        if model is None:
            loaded = ", ".join(str(v) for v in sorted(versions))
            raise NotFound(f"model {name!r} has no loaded version {version}; loaded versions: {loaded}")
        return model

    def _suggest(self, name: str) -> str:
        """The end of a not-found message: the known names closest to `name`, and where to see them all."""
        # Bounded: a long name costs difflib quadratic time, and no model name is longer than this.
        known = set(self._entries) | set(self.repository.model_names())
        near = difflib.get_close_matches(name[:MAX_SUGGESTED_NAME], known, n=3)
        if near:
            return f"did you mean {' or '.join(repr(n) for n in near)}? see `edgecow models list`"
        return "see `edgecow models list` (RepositoryIndex) for the models this server has"

    def loaded_versions(self, name: str) -> list[ModelRuntime]:
        """Every loaded ModelRuntime of `name`, oldest version first; NOT_FOUND (or UNAVAILABLE, with the
        reason) as get() when none is loaded."""
        entry = self._entries.get(name)
        if entry is None or not entry.versions:
            return [self.get(name)]  # raises saying why nothing is loaded, unless a load just landed
        versions = entry.versions
        return [versions[v] for v in sorted(versions)]

    def loaded(self) -> list[ModelRuntime]:
        """Every loaded ModelRuntime, by name then version."""
        entries = self._entries
        return [entry.versions[v] for _, entry in sorted(entries.items()) for v in sorted(entry.versions)]

    def index(self) -> list[ModelState]:
        """Every model on disk or loaded, with its state and, when unavailable, why."""
        states: list[ModelState] = []
        entries = self._entries
        names = set(self.repository.model_names()) | set(entries)
        for name in sorted(names):
            entry = entries.get(name)
            on_disk = self.repository.versions(name)
            if entry is None:
                states.append(ModelState(name, on_disk[-1] if on_disk else 0, "UNLOADED"))
                continue
            if entry.error and not entry.versions:
                states.append(ModelState(name, on_disk[-1] if on_disk else 0, "UNAVAILABLE", entry.error))
            for version in sorted(set(entry.versions) | set(entry.failures)):
                if version in entry.versions:
                    # A broken config.toml keeps what was loaded serving; the reason says why it is stale.
                    reason = f"still serving the loaded version; {entry.error}" if entry.error else ""
                    states.append(ModelState(name, version, "READY", reason))
                else:
                    states.append(ModelState(name, version, "UNAVAILABLE", entry.failures[version]))
            if not entry.versions and not entry.failures and not entry.error:
                states.append(ModelState(name, 0, "UNAVAILABLE", "no version directory holds a model.onnx"))
        return states

    # -- changing ----------------------------------------------------------------------------------
    def load_all(self) -> None:
        """Load every model (or those in settings.models); a broken one is reported, not fatal."""
        wanted = self.settings.models or self.repository.model_names()
        for name in wanted:
            try:
                self.load(name)
            except EdgecowError as err:
                entry = self._entries.get(name)
                if entry is None or not (entry.error or entry.failures):  # _sync has logged those already
                    log.error("%s", err)

    def load(self, name: str) -> None:
        """(Re)load `name` from disk per its version policy; raises when nothing could be loaded."""
        if not NAME_PATTERN.match(name) or not (self.repository.root / name).is_dir():
            raise NotFound(f"model {name!r} is not in the repository")
        with self._lock:
            self._sync(name)
            entry = self._entries[name]
            if not entry.versions:
                reason = entry.error or next(iter(entry.failures.values()), "no version directory holds a model.onnx")
                raise Unavailable(f"model {name!r} could not be loaded: {reason}")

    def unload(self, name: str) -> None:
        with self._lock:
            if name not in self._entries:
                raise NotFound(f"model {name!r} is not loaded")
            self._replace(name, None)
            self.generation += 1
            log.info("unloaded model %s", name)

    def reload_all(self) -> None:
        """Bring every loaded model (and new ones when all are served) in line with the disk."""
        with self._lock:
            names = set(self._entries)
            if not self.settings.models:
                names |= set(self.repository.model_names())
            for name in sorted(names):
                if not (self.repository.root / name).is_dir():
                    self._replace(name, None)
                    self.generation += 1
                    log.info("model %s left the repository; unloaded", name)
                    continue
                self._sync(name)

    def _sync(self, name: str) -> None:
        """Load versions the policy wants and that are new or changed; drop the others."""
        old = self._entries.get(name) or _Entry()
        new = _Entry()
        try:
            config = self.repository.config(name)
        except ConfigError as err:
            new.error = str(err)
            new.versions = dict(old.versions)  # keep serving what was loaded
            new.fingerprints = dict(old.fingerprints)
            self._publish(name, new, old)
            log.error("%s", err)
            return
        for version in config.version_policy.select(self.repository.versions(name)):
            try:
                fingerprint = self.repository.fingerprint(name, version)
            except OSError:
                continue
            if old.fingerprints.get(version) == fingerprint and version in old.versions:
                new.versions[version] = old.versions[version]
                new.fingerprints[version] = fingerprint
                continue
            if old.fingerprints.get(version) == fingerprint and version in old.failures:
                new.failures[version] = old.failures[version]
                new.fingerprints[version] = fingerprint
                continue
            try:
                self.repository.external_files(name, version)  # refuses data files outside the version
                new.versions[version] = self._loader(
                    name, version, self.repository.model_path(name, version), config, self.settings
                )
                log.info("loaded model %s version %d on %s", name, version,
                         ", ".join(new.versions[version].providers))
            except EdgecowError as err:
                new.failures[version] = err.message
                log.error("%s", err)
            new.fingerprints[version] = fingerprint
        self._publish(name, new, old)

    def _publish(self, name: str, new: _Entry, old: _Entry) -> None:
        changed = (
            set(new.versions) != set(old.versions)
            or any(new.versions[v] is not old.versions.get(v) for v in new.versions)
            or new.error != old.error
            or new.failures != old.failures
        )
        self._replace(name, new)  # readers see the old or the new entry whole
        if changed:
            self.generation += 1

    def _replace(self, name: str, entry: _Entry | None) -> None:
        """Publish a new dict with `name` set to `entry` (None removes it); the caller holds the lock."""
        entries = dict(self._entries)
        if entry is None:
            entries.pop(name, None)
        else:
            entries[name] = entry
        self._entries = entries

    # -- polling -----------------------------------------------------------------------------------
    def start_polling(self, interval: float) -> None:
        if interval <= 0 or self._poller is not None:
            return
        self._poller = threading.Thread(target=self._poll, args=(interval,), name="edgecow-poll", daemon=True)
        self._poller.start()

    def _poll(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.reload_all()
            except Exception:  # keep polling whatever one scan hit
                log.exception("repository poll failed")

    def stop(self) -> None:
        self._stop.set()


def _default_loader(
    name: str, version: int, path: Path, config: ModelConfigFile, settings: Settings
) -> ModelRuntime:
    from .runtime import ModelOptions, ModelRuntime

    options = ModelOptions(
        providers=config.providers or tuple(settings.providers),
        intra_op_threads=config.intra_op_threads if config.intra_op_threads is not None else settings.intra_op_threads,
        inter_op_threads=config.inter_op_threads or 0,
        intra_op_spinning=(settings.intra_op_spinning if config.intra_op_spinning is None
                           else config.intra_op_spinning),
        require_gpu=settings.require_gpu if config.require_gpu is None else config.require_gpu,
        warmup=config.warmup,
        model_dir=path.parent.parent,  # <root>/<name>, where config.toml's file names are found
        max_batch_size=config.max_batch_size,
        labels=config.labels,
        custom_op_libraries=config.custom_op_libraries,
        onnxruntime_extensions=config.onnxruntime_extensions,
    )
    return ModelRuntime.load(name, version, path, options)

