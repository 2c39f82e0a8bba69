"""What the tests and the bench share: a real server process, ONNX models, raw gRPC and shared-memory
helpers, and calls held in flight until the test releases them.

    from tests.support.processes import ServerProcess
    from tests.support.models import build_repository

processes   ServerProcess (`python -m edge_server serve` on a temporary socket) and ChildProcess under it
models      ONNX builders (onnx.helper), write_model, the repository most tests share, the `gate` model
gate        Gate (a shared-memory flag the `gate` model waits on) and Call (a call run on a thread)
stubs       raw v2 / edgecow stubs and one-line questions to a server: in_flight, registered_names, live
shm         segments the tests own, /dev/shm snapshots that ignore other suites
notify      systemd's side of $NOTIFY_SOCKET
waiting     wait_until: poll a condition, never sleep a fixed time
arrays      deterministic test data for every datatype
certs       a self-signed certificate for the TLS listener
"""
