"""`steermoe serve`: an OpenAI-compatible HTTP server over one loaded model.

``app.create_app`` builds the FastAPI app and mounts the routes (one module per family:
``transcriptions``, ``chat``, ``system``); ``protocol`` has the request models and OpenAI's error
shape; every route plans its request with ``inference.plan`` (as `infer` does) and runs it through
``jobs`` on ``batcher.Batcher``, which merges concurrent requests into backend batches on a worker
thread. FastAPI, uvicorn and python-multipart come with the ``[serve]`` extra.
"""
