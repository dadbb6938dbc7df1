"""``kvpr serve``: an OpenAI-compatible HTTP server over ``api.LLM``, decoding concurrent requests
in one batch (``batcher.py`` decides, ``runtime.row_batch.RowBatch`` executes) in an engine process
of its own (``engine_main.py``) that the HTTP process talks to over a pipe (``engine_process.py``)."""
