"""Inference: the Python API (``SteerMoE``), the ``Backend`` seam, its torch implementation and
its onnxruntime one (``onnx_backend``: an exported folder, no torch), and output formats. Import
``SteerMoE`` from here.

To add a backend: implement ``inference.backend.Backend`` (encode audio + generate) in a module of
this folder, and construct ``SteerMoE(YourBackend(...))``; windowing, batching, timing and
formats come for free.
"""

from steermoe_core.inference.api import (
    Result,
    Segment,
    SteerMoE,
    default_model_path,
    expand_inputs,
    iter_inputs,
)
from steermoe_core.inference.formats import to_srt

__all__ = ["Result", "Segment", "SteerMoE", "default_model_path", "expand_inputs", "iter_inputs", "to_srt"]
