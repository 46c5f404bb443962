"""The OpenAI-compatible HTTP server (`minicpmv serve`): routes in app.py, the engine thread in
worker.py, request -> engine job in jobs.py, engine outputs -> chunks in completions.py."""
