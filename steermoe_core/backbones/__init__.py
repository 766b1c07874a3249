"""Finding and reading pretrained weights: local paths and hub ids (``weights``), CTranslate2
(faster-whisper) folders (``ctranslate2``), GGUF files (``gguf``) and the frozen causal LLM (``llm``).
To add an LLM weight format, add a reader here and dispatch to it from ``llm.load_llm``."""
