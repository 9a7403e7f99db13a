"""Serving the edit pipeline behind Triton Inference Server.

``interface`` (the request/response tensors and their checks), ``triton_model`` (the Python-backend model),
``repository`` (model repository writer), ``server`` (the bundled ``tritonserver`` process), ``client``
(``tritonclient`` helpers) and ``loadtest`` (client-side latency report).
"""
