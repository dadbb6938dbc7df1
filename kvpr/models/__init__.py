"""Model math (OPT and the Llama family) and weight loading; no cache, no streams."""
