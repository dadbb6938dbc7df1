"""``kvpr serve``: an OpenAI-compatible HTTP server over ``api.LLM``, decoding concurrent requests
in one batch (``batcher.py`` decides, ``runtime.row_batch.RowBatch`` executes)."""
