"""``kvpr sim``: an analytical model of the KVO-LLM accelerator fed by kvpr's own KVO traffic, and the
same operator and memory model parameterised for a measured GPU (DESIGN.md section 3).

workload.py (what a decode step asks: ops, MACs, bytes from the codecs), hardware.py (the machines
and their sources), dataflow.py (cycles of one op), engine.py (a step: phases, fusion, interleaving,
utilisation, energy), gpu.py (the H200 from its measured profile), validation.py (predicted against
the committed H200 measurements), report.py (JSON and PNG), cli.py (``kvpr sim``).
"""
