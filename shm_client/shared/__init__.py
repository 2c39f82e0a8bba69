"""The layer the client and the server share: nothing here knows which side it runs on.

    from shm_client.shared import datatypes, errors, wire
    datatypes.lookup("FP32")        # the one datatype table

Modules: `datatypes` (v2 name, numpy dtype, size), `errors` (exceptions carrying their gRPC status), `wire`
(the ModelInfer codec), `framing` (the local lane's length-prefixed frames), `segments` (POSIX shm objects:
names, opening, mapping, reaping), `_proto` (generated protobuf and gRPC code).
"""
