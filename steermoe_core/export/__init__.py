"""Export a checkpoint for runtimes without PyTorch (`steermoe export`).

``graphs`` wraps the model's audio tower and LLM decoder as exportable modules; ``onnx_export``
writes the folder that ``inference.onnx_backend`` runs; ``cache`` keeps such folders for
``--backend auto`` (``inference.choice``), each frozen LLM's part exported once and shared. The
folder's contract (file names, format version, manifest checks) lives beside that reader, in
``inference.onnx_manifest``, so the dependency points one way: export -> inference; the one way back
is ``inference.choice`` calling ``cache`` inside the function that must export.
"""
