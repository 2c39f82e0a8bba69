"""Builds and runs the daemon: gRPC on a unix socket and TCP, health, reflection, signals, drain.

    settings = load_settings(overrides={"model_repository": "models"})
    sys.exit(serve(settings))          # returns when SIGTERM/SIGINT has drained the server

Start order: check the socket paths, load models, bind both listeners, start, then READY=1. Stop:
STOPPING=1, refuse new calls, let calls in flight finish within the grace period, unmap and unlink what the
server owns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import socket
import ssl
import stat
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from shm_client.shared._proto import POOL
from shm_client.shared.errors import EdgecowError, FailedPrecondition

from .config import Settings, flag_of, load_settings
from .dataplane import DataPlane
from .grpc_service import ServerState, add_services
from .local_lane import LocalLane
from .metrics import MetricsEndpoint, ServerCollector, metrics_wanted
from .regions import Beacon, RegionRegistry
from .repository import ModelStore, Repository
from .runtime import gpu_usable
from .sd_notify import Notifier, Watchdog
from .transport import InferAdapter

log = logging.getLogger("edgecow")

SERVICE_NAMES = ("inference.GRPCInferenceService", "edgecow.v1.EdgecowService")
WATCHDOG_PROBE_TIMEOUT = 2.0  # seconds the watchdog's health check waits for each answer
# The client's connection preface and an empty SETTINGS frame (RFC 9113 3.4); the server answers with
# its own SETTINGS frame, whose 9-byte header carries the type in byte 3.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_HTTP2_FRAME_HEADER = 9
_HTTP2_SETTINGS = 4


def configure_logging(level: str) -> None:
    # journald stamps each line itself; a terminal gets the time.
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else (
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.basicConfig(level=level.upper(), format=fmt, force=True)


def _raise_fd_limit() -> None:
    # Each registered region keeps a descriptor open for its per-call size check.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _prepare_socket(path: Path, remedy: str = "choose another --socket") -> None:
    """Make the directory; remove a stale socket file, refuse if a live server holds it or if the path
    is something else (never delete what is not ours). `remedy` ends the error messages."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    if not path.exists() and not path.is_symlink():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise FailedPrecondition(f"{path} exists and is not a socket; remove it or {remedy}")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nothing listens: left by a server that died
        return
    finally:
        probe.close()
    raise FailedPrecondition(f"another server is already listening on {path}; stop it or {remedy}")


def check_tcp_address(address: str, source: str, flag: str) -> None:
    """Refuse at once a TCP HOST:PORT this process cannot listen on (in use, not this machine's, no rights),
    naming where the address was set (`source`) and which `flag` changes it."""
    host, _, port = address.strip().rpartition(":")
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (OSError, ValueError) as err:
        raise FailedPrecondition(f"cannot listen on {address} (from {source}): {err}; fix the host or choose "
                                 f"another {flag}") from None
    for family, kind, proto, _, sockaddr in infos:  # gRPC binds every address the host resolves to
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT is no clash
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(sockaddr)
            except OSError as err:
                raise FailedPrecondition(f"cannot listen on {address} (from {source}): {err.strerror}; stop "
                                         f"what uses it or choose another {flag}") from None


def lane_path_for(socket_path: Path) -> Path:
    """The local lane's socket beside the gRPC one: edgecow.sock -> edgecow-lane.sock."""
    return socket_path.with_name(f"{socket_path.stem}-lane.sock")


def transport_answers(address: str, tls: bool, timeout: float = WATCHDOG_PROBE_TIMEOUT) -> bool:
    """Whether gRPC's transport on `address` ("unix:/path" or "host:port") completes a connection: the
    (TLS and) HTTP/2 handshake up to the server's SETTINGS frame.

    grpc core does that in its own threads, so this holds while every Python worker is busy with long
    calls, yet fails when the process is wedged. The TLS handshake skips certificate checks: it talks to
    this very process, sends nothing secret, and must work with any certificate the operator installed.
    """
    try:
        if address.startswith("unix:"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(address.removeprefix("unix:"))
        else:
            host, _, port = address.rpartition(":")
            sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            context.set_alpn_protocols(["h2"])
            sock = context.wrap_socket(sock)
        with sock:
            sock.sendall(_HTTP2_PREFACE)
            frame = b""
            while len(frame) < _HTTP2_FRAME_HEADER:
                chunk = sock.recv(_HTTP2_FRAME_HEADER - len(frame))
                if not chunk:
                    return False
                frame += chunk
            return frame[3] == _HTTP2_SETTINGS
    except (OSError, ValueError):
        return False


class EdgecowServer:
    """One running daemon; `start()` binds and loads, `stop()` drains and cleans up."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.notifier = Notifier.from_env()
        self.store = ModelStore(Repository(settings.model_repository), settings)
        self.registry = RegionRegistry(settings.shm_max_regions, settings.shm_max_mapped_bytes)
        self.plane = DataPlane(self.store, self.registry, settings)
        self.state = ServerState(settings, self.store, self.registry, self.plane)
        self.health = health.HealthServicer()
        self.grpc: grpc.Server | None = None
        self.socket_path: Path | None = None
        self._stop = threading.Event()  # tells the server's own threads to end; set by stop()
        self._stop_requested = False  # set by a signal handler (see handle_signals)
        self._reload_requested = False
        self._watchdog: Watchdog | None = None
        self._housekeeper: threading.Thread | None = None
        self.lane: LocalLane | None = None
        self.metrics: MetricsEndpoint | None = None

    # -- start -----------------------------------------------------------------------------------------
    def start(self) -> None:
        settings = self.settings
        _raise_fd_limit()
        if settings.require_gpu and not gpu_usable():
            raise FailedPrecondition("require_gpu is set but no GPU execution provider can start on this machine")
        if not settings.model_repository.is_dir():
            raise FailedPrecondition(f"model repository {settings.model_repository} is not a directory")
        self._prepare_sockets()  # before the models load: a clash must not cost a minute of loading first
        self._start_metrics()  # also before: a port in use shows at once, and scrapes see the models load
        self.store.load_all()
        if settings.shm_enabled:
            self.state.beacon = Beacon()
        limit = settings.max_request_bytes
        options = [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.workers), options=options)
        add_services(server, self.state)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self._enable_reflection(server)
        self._bind(server)
        server.start()
        self.grpc = server
        self._start_lane()
        self.state.ready = True
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.store.start_polling(settings.poll_interval)
        self._housekeeper = threading.Thread(target=self._housekeeping, name="edgecow-housekeeping", daemon=True)
        self._housekeeper.start()
        summary = self.summary()
        log.info("ready: %s", summary)
        self.notifier.ready(summary)
        self._watchdog = Watchdog(self.notifier, self.answers)
        self._watchdog.start()

    def _enable_reflection(self, server: grpc.Server) -> None:
        # Our descriptors live in edgecow's private pool (see scripts/gen_proto.py); reflection reads
        # that pool, so the health and reflection files are added to it too.
        for module in (health_pb2, reflection_pb2):
            with contextlib.suppress(TypeError):
                POOL.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
        names = (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server, pool=POOL)

    def _prepare_sockets(self) -> None:
        settings = self.settings
        if settings.listen.strip().lower() not in ("", "none", "off"):
            check_tcp_address(settings.listen, settings.source("listen"), flag_of("listen"))
        for name in ("tls_cert", "tls_key"):
            tls_file = getattr(settings, name)
            if tls_file is not None and not os.access(tls_file, os.R_OK):
                raise FailedPrecondition(f"{name} {tls_file} (from {settings.source(name)}) cannot be read; fix "
                                         "the path or its permissions")
        path = settings.socket_path()
        if path is None:
            return
        _prepare_socket(path)
        if self._lane_wanted():
            _prepare_socket(lane_path_for(path), "choose another --socket, or pass --no-local-lane")

    def _start_metrics(self) -> None:
        if not metrics_wanted(self.settings.metrics_listen):
            return
        collector = ServerCollector(self.store, self.registry, self.plane)
        self.metrics = MetricsEndpoint.bind(self.settings.metrics_listen, collector,
                                            self.settings.source("metrics_listen"), flag_of("metrics_listen"))
        self.metrics.start()
        log.info("metrics on %s", self.metrics.url)

    def _lane_wanted(self) -> bool:
        settings = self.settings
        return (settings.local_lane and settings.shm_enabled and settings.socket_path() is not None
                and "unix" in settings.local_peers)

    def _bind(self, server: grpc.Server) -> None:
        settings = self.settings
        path = settings.socket_path()
        if path is not None:
            _prepare_socket(path)  # again: a socket may have appeared while the models loaded
            server.add_insecure_port(f"unix:{path}")
            self.socket_path = path
            os.chmod(path, 0o660)
            self.state.listeners.append(f"unix:{path}")
        if settings.listen.strip().lower() not in ("", "none", "off"):
            host = settings.listen.rpartition(":")[0]
            try:
                if settings.tls_cert and settings.tls_key:
                    credentials = grpc.ssl_server_credentials(
                        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())]
                    )
                    bound = server.add_secure_port(settings.listen, credentials)
                else:
                    bound = server.add_insecure_port(settings.listen)
            except RuntimeError:  # grpc's "failed to bind": the port was taken while the models loaded
                bound = 0
            if not bound:
                raise FailedPrecondition(f"cannot listen on {settings.listen} (from {settings.source('listen')}): "
                                         f"the port is in use; stop what uses it or choose another "
                                         f"{flag_of('listen')}")
            self.state.listeners.append(f"{host}:{bound}")
        if not self.state.listeners:
            raise FailedPrecondition("neither a unix socket nor a TCP address to listen on; set --socket or --listen")
        for listener in self.state.listeners:
            log.info("listening on %s", listener)

    def _start_lane(self) -> None:
        if not self._lane_wanted() or self.socket_path is None:
            return
        path = lane_path_for(self.socket_path)
        self.lane = LocalLane(path, InferAdapter(self.plane), self.settings)
        self.lane.start()
        self.state.lane_path = str(path.resolve())
        log.info("local lane on %s", path)

    # -- running ---------------------------------------------------------------------------------------
    def summary(self) -> str:
        models = self.store.loaded()
        names = ", ".join(f"{m.name}:{m.version}" for m in models) or "no models"
        return (
            f"{len(models)} model version(s) [{names}], {len(self.registry)} shm region(s), "
            f"{self.plane.admission.in_flight} call(s) in flight"
        )

    def answers(self) -> bool:
        """The watchdog's health check: the data plane's lock can be taken and gRPC's transport completes
        a connection (the unix socket when there is one, else TCP, with TLS when it is on).

        Neither needs a free gRPC worker, so a server whose workers all run long calls or hold streams is
        healthy, and one whose data plane or gRPC core is wedged is not.
        """
        if self.grpc is None or not self.state.listeners:
            return False
        if not self.plane.admission.responsive(WATCHDOG_PROBE_TIMEOUT):
            log.warning("watchdog: the data plane's lock was not free within %ss", WATCHDOG_PROBE_TIMEOUT)
            return False
        target = self.state.listeners[0]
        tls = False
        if not target.startswith("unix:"):
            target = target.replace("0.0.0.0:", "127.0.0.1:").replace("[::]:", "[::1]:")
            tls = self.settings.tls_cert is not None
        if not transport_answers(target, tls):
            log.warning("watchdog: %s did not complete a connection within %ss", target, WATCHDOG_PROBE_TIMEOUT)
            return False
        return True

    def _housekeeping(self) -> None:
        last = ""
        while not self._stop.wait(self.settings.shm_reap_interval):
            try:
                self.registry.reap()
                summary = self.summary()
                if summary != last:
                    self.notifier.status(summary)
                    last = summary
            except Exception:  # housekeeping must never stop
                log.exception("housekeeping failed")

    def reload(self, config_file: Path | None) -> None:
        """SIGHUP: re-read the log level from the configuration and the repository from disk."""
        self.notifier.reloading()
        try:
            if config_file is not None:
                fresh = load_settings(config_file)
                configure_logging(fresh.log_level)
            self.store.reload_all()
            log.info("reloaded: %s", self.summary())
        except EdgecowError as err:
            log.error("reload failed: %s", err)
        self.notifier.ready(self.summary())

    def handle_signals(self) -> None:
        """SIGTERM/SIGINT stop, SIGHUP reloads. Installed before start(), so a signal that arrives right
        after READY=1 drains the server instead of killing it (SIGTERM) or raising KeyboardInterrupt.

        The handlers only set flags: a handler runs on the main thread between two bytecodes, and one
        that took a lock (Event.set does) deadlocks when the signal lands while that lock is held, as a
        second SIGTERM arriving during the first handler's Event.set did.
        """

        def request_stop(*_: object) -> None:
            self._stop_requested = True

        def request_reload(*_: object) -> None:
            self._reload_requested = True

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGHUP, request_reload)

    def run(self, config_file: Path | None = None) -> None:
        """Serve until SIGTERM or SIGINT (see handle_signals); SIGHUP reloads."""
        while not self._stop_requested:
            time.sleep(0.1)
            if self._reload_requested:
                self._reload_requested = False
                self.reload(config_file)
        self.stop()

    # -- stop ------------------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()
        self.notifier.stopping()
        log.info("stopping: letting %d call(s) in flight finish (up to %.0fs)",
                 self.plane.admission.in_flight, self.settings.grace_period)
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.state.ready = False
        if not self.plane.admission.drain(self.settings.grace_period):
            log.warning("grace period over with %d call(s) still running", self.plane.admission.in_flight)
        if self.lane is not None:
            self.lane.stop()
        if self._watchdog is not None:
            self._watchdog.stop()
        self.store.stop()
        if self.grpc is not None:
            self.grpc.stop(grace=1.0).wait()
        self.registry.close()
        if self.state.beacon is not None:
            self.state.beacon.close()
        if self.socket_path is not None:
            with contextlib.suppress(OSError):
                self.socket_path.unlink()
        if self.metrics is not None:
            self.metrics.stop()
        log.info("stopped")


def serve(settings: Settings, config_file: Path | None = None) -> int:
    """Run a server with `settings` until it is told to stop; returns the exit code."""
    configure_logging(settings.log_level)
    server = EdgecowServer(settings)
    server.handle_signals()
    try:
        server.start()
    except EdgecowError as err:
        log.error("cannot start: %s", err.message)
        server.stop()
        return 1
    except BaseException:
        server.stop()  # the beacon segment and socket files go even on an unexpected failure
        raise
    server.run(config_file)
    return 0
