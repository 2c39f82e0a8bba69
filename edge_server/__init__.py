"""edgecow's server: ONNX models in onnxruntime behind the KServe v2 gRPC protocol.

    edgecow serve --model-repository ./models          # or: python -m edge_server serve
    edgecow status                                     # what the running server holds

Importing this package is light (no onnxruntime); the heavy modules load when a server is built.
"""

__version__ = "0.1.0"
