"""Export a checkpoint for runtimes without PyTorch (`steermoe export`).

``onnx_manifest`` is the folder format's contract (torch-free: the onnxruntime backend reads it);
``graphs`` wraps the model's audio tower and LLM decoder as exportable modules; ``onnx_export``
writes the folder. Import the submodules, not this package: importing it must stay cheap, since
the onnxruntime backend reaches ``onnx_manifest`` through it without torch.
"""
