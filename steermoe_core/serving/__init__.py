"""`steermoe serve`: an OpenAI-compatible HTTP server over one loaded model.

``app.create_app`` builds the FastAPI app (transcriptions, chat completions, models, health,
metrics and the page in ``static/``); ``batcher.Batcher`` merges concurrent requests into backend
batches on a worker thread; ``llm`` holds what the server needs from a backend beyond
``Backend.generate``. FastAPI, uvicorn and python-multipart come with the ``[serve]`` extra.
"""
