"""Helpers shared by the benchmark scripts: provenance (commit, source hashes, machine) and module listing."""

from __future__ import annotations

import ctypes
import gc
import hashlib
import os
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any


REPO_ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=True
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def source_digests(files: Iterable[Path]) -> dict[str, str]:
    """sha256 of the measured sources: the working tree may differ from the commit."""
    return {str(f.relative_to(REPO_ROOT)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.exists()}


def machine_info(**extra: Any) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        **extra,
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    except OSError:
        pass
    return info


def adapted_module_names(peft_model) -> list[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    prefix = "base_model.model."
    return sorted(
        name.removeprefix(prefix) for name, module in peft_model.named_modules() if isinstance(module, BaseTunerLayer)
    )


# ------------------------------------------------------------------------------------------- process memory (Linux)
def read_status_kb(field: str) -> int | None:
    """A `/proc/self/status` field in kB (`VmRSS`, `VmHWM`, ...); `None` where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """`gc` + `malloc_trim`: hand freed heap pages back so that RSS reflects live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
