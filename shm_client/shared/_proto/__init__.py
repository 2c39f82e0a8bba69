"""Generated protobuf and gRPC modules for edgecow; regenerate with `python scripts/gen_proto.py`.

    from shm_client.shared._proto import inference_pb2, inference_pb2_grpc
    request = inference_pb2.ModelInferRequest(model_name="add")
"""

from google.protobuf import descriptor_pool

# edgecow's private descriptor pool; see scripts/gen_proto.py for why it is not the default one.
POOL = descriptor_pool.DescriptorPool()
