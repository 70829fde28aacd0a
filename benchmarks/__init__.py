"""The benchmarks of peft-selective: one script per question, run as `python benchmarks/<name>.py` or
`python -m benchmarks.<name>` from the repository root (see benchmarks/README.md). `benchmarks.methods` is the one
registry of the adapter methods they compare; `benchmarks._common` holds their shared helpers. Not installed with
the library."""
