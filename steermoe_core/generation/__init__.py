"""Backends and guarded generation, below every workflow that decodes: the ``Backend`` seam
(``backend``), the PyTorch backend (``torch_backend``), the per-row budget and loop stops
(``guards``) and guarded decoding of audio rows and text-only chats on any backend (``chat``).

`inference` (the API, the request planner, the server's jobs) and `training` (behaviour-alignment
targets from the frozen LLM) both use it; it imports neither.
"""
