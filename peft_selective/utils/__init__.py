"""Helpers every wing of the package may use: atomic file writes (`io`), the known third-party warnings silenced
(`warnings`), what a result file records about the CPU (`machine`)."""
