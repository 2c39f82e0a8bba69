"""Thin gRPC servicers: protobuf in, DataPlane / store / registry calls, protobuf out.

    add_services(server, state)    # inference.GRPCInferenceService + edgecow.v1.EdgecowService

Every EdgecowError is turned into its status code here, once; anything else is logged and answered
INTERNAL without internals in the message.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar, cast

import grpc

from edge_server import __version__
from shm_client.shared._proto import edgecow_pb2, edgecow_pb2_grpc
from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared._proto import inference_pb2_grpc as pb_grpc
from shm_client.shared.errors import (
    EdgecowError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)

from . import convert, status
from .batching import config_dims
from .config import Settings
from .dataplane import DataPlane
from .messages import Cancellation
from .regions import Beacon, RegionRegistry, probe_client_segment
from .repository import ModelStore
from .runtime import ModelRuntime, usable_providers
from .transport import PREPARED_MAX_BYTES, InferAdapter, Slots, peer_host

log = logging.getLogger(__name__)

EXTENSIONS = [
    "model_repository",
    "model_configuration",
    "system_shared_memory",
    "statistics",
    "binary_tensor_data",
    "parameters",
    "edgecow",
]
STREAM_DEADLINE_SLACK = 0.1  # seconds

_Servicer = TypeVar("_Servicer")
_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


@dataclass
class ServerState:
    """Everything the servicers share."""

    settings: Settings
    store: ModelStore
    registry: RegionRegistry
    plane: DataPlane
    beacon: Beacon | None = None
    lane_path: str = ""  # the local lane's socket, offered to callers whose shared memory is proven
    listeners: list[str] = field(default_factory=list)
    ready: bool = False
    started: float = field(default_factory=time.time)


def is_local_peer(peer: str, kinds: Sequence[str] = ("unix",)) -> bool:
    """Whether a gRPC peer is on this machine: a unix socket ("unix" in `kinds`) or a loopback address
    ("loopback" in `kinds`).

    gRPC percent-encodes the brackets of IPv6 peers ("ipv6:%5B::1%5D:5000"), so the host is unquoted
    before it is parsed.
    """
    if peer_is_unix(peer):
        return "unix" in kinds
    if "loopback" not in kinds:
        return False
    kind, _, address = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return False
    host = urllib.parse.unquote(address).rsplit(":", 1)[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def peer_is_unix(peer: str) -> bool:
    return peer.startswith("unix:") or peer.startswith("unix-abstract:")


def _stream_expired(context: grpc.ServicerContext) -> bool:
    """Whether the RPC's own deadline has passed (the data plane measured it a moment ago, so a little
    slack covers the two clocks' reads)."""
    remaining = context.time_remaining()
    return remaining is not None and remaining < STREAM_DEADLINE_SLACK


def _abort(context: grpc.ServicerContext, err: EdgecowError) -> NoReturn:
    context.abort(err.code, err.message)


def handled(
    method: Callable[[_Servicer, _Request, grpc.ServicerContext], _Response],
) -> Callable[[_Servicer, _Request, grpc.ServicerContext], _Response]:
    """Map EdgecowError to its status code; other exceptions to INTERNAL with a generic message."""

    @functools.wraps(method)
    def wrapper(self: _Servicer, request: _Request, context: grpc.ServicerContext) -> _Response:
        try:
            return method(self, request, context)
        except EdgecowError as err:
            _abort(context, err)
        except MemoryError:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the server ran out of memory for this call")
        except Exception:
            # code() is in grpc's ServicerContext (experimental) but not in types-grpcio's stub.
            if context.code() is not None:  # type: ignore[attr-defined]  # already aborted
                raise
            log.exception("unexpected error in %s", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__} failed inside the server; see its log")

    return wrapper


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.adapter = InferAdapter(state.plane)
        total, per_peer = state.settings.stream_limits()
        self.streams = Slots(total, per_peer, "streams", "max_streams", "max_streams_per_peer")

    def _local(self, context: grpc.ServicerContext) -> bool:
        return is_local_peer(context.peer(), self.state.settings.local_peers)

    # -- health ----------------------------------------------------------------------------------------
    @handled
    def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @handled
    def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.state.ready and self.state.plane.admission.accepting)

    @handled
    def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.ServicerContext) -> pb.ModelReadyResponse:
        try:
            self.state.store.get(request.name, request.version)
        except EdgecowError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.state.plane.admission.accepting)

    # -- metadata --------------------------------------------------------------------------------------
    @handled
    def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="edgecow", version=__version__, extensions=EXTENSIONS)

    @handled
    def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ModelMetadataResponse:
        model = self.state.store.get(request.name, request.version)
        versions = [str(m.version) for m in self.state.store.loaded() if m.name == model.name]
        response = pb.ModelMetadataResponse(name=model.name, versions=versions, platform="onnxruntime_onnx")
        for spec in model.inputs:
            convert.to_tensor_metadata(response.inputs.add(), spec)
        for spec in model.outputs:
            convert.to_tensor_metadata(response.outputs.add(), spec)
        return response

    @handled
    def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.ServicerContext) -> pb.ModelConfigResponse:
        model = self.state.store.get(request.name, request.version)
        config = pb.ModelConfig(
            name=model.name, platform="onnxruntime_onnx", backend="onnxruntime", max_batch_size=model.max_batch_size
        )
        policy = self.state.store.repository.config(model.name).version_policy
        if policy.kind == "all":
            config.version_policy.all.SetInParent()
        elif policy.kind == "specific":
            config.version_policy.specific.versions.extend(policy.versions)
        else:
            config.version_policy.latest.num_versions = policy.count
        for spec in model.inputs:
            config.input.add(
                name=spec.name, data_type=spec.datatype.config_enum, dims=config_dims(model, spec),
                optional=spec.optional,
            )
        for spec in model.outputs:
            config.output.add(name=spec.name, data_type=spec.datatype.config_enum, dims=config_dims(model, spec))
        return pb.ModelConfigResponse(config=config)

    @handled
    def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        store = self.state.store
        if not request.name:
            models = store.loaded()
        elif request.version:
            models = [store.get(request.name, request.version)]
        else:
            # The protocol: a name without a version asks for every loaded version of that model.
            models = store.loaded_versions(request.name)
        response = pb.ModelStatisticsResponse()
        for model in models:
            response.model_stats.append(self._stats(model))
        return response

    def _stats(self, model: ModelRuntime) -> pb.ModelStatistics:
        stats = self.state.plane.statistics.of(model)
        message = pb.ModelStatistics(
            name=model.name,
            version=str(model.version),
            last_inference=stats.last_inference_ms,
            inference_count=stats.inference_count,
            execution_count=stats.execution_count,
        )
        for name in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
            duration = getattr(stats, name)
            target = getattr(message.inference_stats, name)
            target.count = duration.count
            target.ns = duration.ns
        message.inference_stats.cache_hit.SetInParent()
        message.inference_stats.cache_miss.SetInParent()
        return message

    # -- inference: framing only, the call itself is the shared InferAdapter's ---------------------------
    def _infer(
        self,
        request: bytes | convert.SplitInferRequest | pb.ModelInferRequest,
        context: grpc.ServicerContext,
        cancellation: Cancellation,
    ) -> convert.InferReply:
        if isinstance(request, bytes):  # a small message, left undecoded by decode_model_infer
            return self.adapter.infer_body(
                request, local=self._local(context), transport_remaining=context.time_remaining(),
                cancellation=cancellation,
            )
        return self.adapter.infer(
            request, local=self._local(context), transport_remaining=context.time_remaining(),
            cancellation=cancellation,
        )

    @handled
    def ModelInfer(  # type: ignore[override]  # add_services swaps its codec: see decode_model_infer; an InferReply out
        self, request: bytes | convert.SplitInferRequest, context: grpc.ServicerContext
    ) -> convert.InferReply:
        cancellation = Cancellation()
        context.add_callback(cancellation.cancel)  # fires when the RPC ends, early if the caller went away
        return self._infer(request, context, cancellation)

    def ModelStreamInfer(
        self, request_iterator: Iterator[pb.ModelInferRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ModelStreamInferResponse]:
        # An open stream holds a worker thread, so streams are bounded to leave workers for everyone else.
        peer = peer_host(context.peer())
        try:
            self.streams.acquire(peer)
        except ResourceExhausted as err:
            context.abort(err.code, err.message)
        try:
            # Calls on a stream run one at a time; a caller that goes away cancels the one running.
            cancellation = Cancellation()
            context.add_callback(cancellation.cancel)
            for request in request_iterator:
                try:
                    response = convert.to_full_response(*self._infer(request, context, cancellation))
                    yield pb.ModelStreamInferResponse(infer_response=response)
                except EdgecowError as err:
                    if err.code == grpc.StatusCode.DEADLINE_EXCEEDED and _stream_expired(context):
                        # The stream's own deadline passed, not the call's `timeout`: as in Triton, the stream
                        # ends with that status (gRPC's own words first) instead of an in-stream error.
                        context.abort(
                            grpc.StatusCode.DEADLINE_EXCEEDED,
                            "Deadline Exceeded: the stream's deadline passed during a call; open the stream with "
                            "a longer timeout",
                        )
                    yield pb.ModelStreamInferResponse(
                        error_message=f"{err.code.name}: {err.message}",
                        infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id),
                    )
        finally:
            self.streams.release(peer)

    # -- repository ------------------------------------------------------------------------------------
    @handled
    def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        self._check_repository(request.repository_name)
        response = pb.RepositoryIndexResponse()
        for state in self.state.store.index():
            if request.ready and state.state != "READY":
                continue
            response.models.add(
                name=state.name, version=str(state.version) if state.version else "", state=state.state,
                reason=state.reason,
            )
        return response

    @handled
    def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        self._check_repository(request.repository_name)
        self._check_control(context, "load models")
        if request.parameters:
            raise Unimplemented("RepositoryModelLoad parameters (config or file overrides) are not supported")
        if not request.model_name:
            raise InvalidArgument("model_name is empty; name the model to load")
        self.state.store.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @handled
    def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        self._check_repository(request.repository_name)
        self._check_control(context, "unload models")
        if not request.model_name:
            raise InvalidArgument("model_name is empty; name the model to unload")
        self.state.store.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    def _check_repository(self, name: str) -> None:
        if name not in ("", "default", self.state.store.repository.root.name):
            raise NotFound(f"repository {name!r} is not served here; leave repository_name empty")

    def _check_control(self, context: grpc.ServicerContext, action: str) -> None:
        check_repository_control(self.state, context, action)

    # -- system shared memory --------------------------------------------------------------------------
    def _check_shm(self, context: grpc.ServicerContext) -> None:
        if not self.state.settings.shm_enabled:
            raise Unimplemented("shared memory is disabled on this server; send tensors in the request")
        if not self.state.settings.shm_allow_remote and not self._local(context):
            raise PermissionDenied("shared memory can only be registered by callers on this machine")

    @handled
    def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: grpc.ServicerContext
    ) -> pb.SystemSharedMemoryStatusResponse:
        response = pb.SystemSharedMemoryStatusResponse()
        if not self.state.settings.shm_enabled:
            return response
        self._check_shm(context)  # keys name other callers' objects: only for those who may use them
        for region in self.state.registry.status(request.name):
            status = response.regions[region.name]
            status.name = region.name
            status.key = "/" + region.key
            status.offset = region.offset
            status.byte_size = region.byte_size
        return response

    @handled
    def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: grpc.ServicerContext
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self._check_shm(context)
        self.state.registry.register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @handled
    def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: grpc.ServicerContext
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self._check_shm(context)
        self.state.registry.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    # -- CUDA shared memory: not on this server --------------------------------------------------------
    @handled
    def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: grpc.ServicerContext
    ) -> pb.CudaSharedMemoryStatusResponse:
        if request.name:
            raise NotFound(f"CUDA shared-memory region {request.name!r} is not registered")
        return pb.CudaSharedMemoryStatusResponse()

    @handled
    def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: grpc.ServicerContext
    ) -> pb.CudaSharedMemoryRegisterResponse:
        raise Unimplemented("CUDA shared memory is not supported by edgecow; use system shared memory")

    @handled
    def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: grpc.ServicerContext
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        return pb.CudaSharedMemoryUnregisterResponse()  # nothing is ever registered, so this always holds

    @handled
    def TraceSetting(self, request: pb.TraceSettingRequest, context: grpc.ServicerContext) -> pb.TraceSettingResponse:
        raise Unimplemented("tracing is not supported by edgecow")

    @handled
    def LogSettings(self, request: pb.LogSettingsRequest, context: grpc.ServicerContext) -> pb.LogSettingsResponse:
        raise Unimplemented("log settings cannot be changed at run time; use --log-level")


def check_repository_control(state: ServerState, context: grpc.ServicerContext, action: str) -> None:
    """Repository control (load, unload, reload) is for local callers, and only while the server does not poll."""
    if not is_local_peer(context.peer(), state.settings.local_peers) and not state.settings.shm_allow_remote:
        raise PermissionDenied(f"only callers on this machine may {action}")
    if state.settings.poll_interval > 0:
        # The next scan would undo the call within poll_interval seconds; Triton refuses it the same way.
        raise Unavailable(
            "explicit model load / unload is not allowed if polling is enabled; change the repository on "
            "disk instead, or run the server without --poll-interval"
        )


class EdgecowServicer(edgecow_pb2_grpc.EdgecowServiceServicer):
    """edgecow.v1.EdgecowService: the shared-memory probe, status figures and the repository rescan."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    @handled
    def ProbeSharedMemory(
        self, request: edgecow_pb2.ProbeSharedMemoryRequest, context: grpc.ServicerContext
    ) -> edgecow_pb2.ProbeSharedMemoryResponse:
        state = self.state
        response = edgecow_pb2.ProbeSharedMemoryResponse()
        if not state.settings.shm_enabled:
            response.reason = "shared memory is disabled on this server"
            return response
        if not state.settings.shm_allow_remote and not is_local_peer(context.peer(), state.settings.local_peers):
            response.reason = "the caller is not on this machine"
            return response
        matched, reason = probe_client_segment(request.key, request.token)
        response.matched = matched
        response.reason = reason or ("" if matched else "the server read different bytes")
        if matched and state.lane_path and peer_is_unix(context.peer()):
            response.local_lane = state.lane_path
        if state.beacon is not None and state.beacon.segment is not None:
            response.beacon_key = state.beacon.key
            response.beacon_sha256 = state.beacon.sha256
            response.beacon_byte_size = state.beacon.SIZE
        return response

    @handled
    def GetStatus(
        self, request: edgecow_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> edgecow_pb2.GetStatusResponse:
        state = self.state
        local = is_local_peer(context.peer(), state.settings.local_peers)
        response = edgecow_pb2.GetStatusResponse(
            version=__version__,
            # A remote caller learns the TCP listeners it can already reach, not the socket path or the pid.
            listeners=[addr for addr in state.listeners if local or not addr.startswith("unix:")],
            available_providers=usable_providers(),
            registered_regions=len(state.registry),
            mapped_bytes=state.registry.mapped_bytes(),
            shared_memory_enabled=state.settings.shm_enabled,
        )
        for model in state.store.loaded():
            stats = state.plane.statistics.of(model)
            gate = state.plane.admission.gate(model.name)
            response.models.add(
                name=model.name, version=str(model.version), providers=model.providers,
                inference_count=stats.inference_count, in_flight=gate.running,
            )
        status.add_host_figures(response, started=state.started, show_pid=local)
        return response

    @handled
    def ReloadRepository(
        self, request: edgecow_pb2.ReloadRepositoryRequest, context: grpc.ServicerContext
    ) -> edgecow_pb2.ReloadRepositoryResponse:
        check_repository_control(self.state, context, "reload the repository")
        store = self.state.store
        store.reload_all()
        names = ", ".join(f"{m.name}:{m.version}" for m in store.loaded()) or "no models"
        log.info("reloaded on request: %s", names)
        return edgecow_pb2.ReloadRepositoryResponse(summary=f"{len(store.loaded())} model version(s) [{names}]")


class _Captured:
    """Stands in for a grpc.Server to collect the handlers the generated code would register."""

    def __init__(self) -> None:
        self.service = ""
        # The handlers' request and response types differ from method to method.
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        pass

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.service, self.handlers = service, dict(handlers)


def decode_model_infer(data: bytes) -> bytes | convert.SplitInferRequest:
    """ModelInfer's request deserializer: a small message stays bytes, for InferAdapter.infer_body to
    decode once and remember (a request over shared memory is a few hundred bytes, repeated call after
    call); a larger one carries its tensors and is split here, its raw tensors left as views."""
    return data if len(data) <= PREPARED_MAX_BYTES else convert.decode_infer_request(data)


def add_services(server: grpc.Server, state: ServerState) -> None:
    # The generated registration for the v2 service, with ModelInfer's codec swapped for one that
    # leaves raw tensors out of protobuf (see shm_client.shared.wire): the large-tensor path copies each
    # tensor once instead of five or six times.
    captured = _Captured()
    # A cast: the generated function calls only the two methods _Captured has of a grpc.Server.
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(state), cast(grpc.Server, captured))
    handlers = captured.handlers
    model_infer = handlers["ModelInfer"].unary_unary
    assert model_infer is not None  # ModelInfer is a unary call
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
        model_infer,
        request_deserializer=decode_model_infer,
        response_serializer=convert.encode_infer_response,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(captured.service, handlers),))
    server.add_registered_method_handlers(captured.service, handlers)
    edgecow_pb2_grpc.add_EdgecowServiceServicer_to_server(EdgecowServicer(state), server)

