"""What a result file records about the CPU it ran on.

Numbers from training on CPU are not guaranteed to reproduce across kinds of CPU: the kernels differ (AVX2, AVX512,
AVX512-BF16, AMX) and so may the rounding, which greedy generations during training (retention anchors, boundary
answers) could turn into different training data; bitsandbytes' 4-bit path also changes with AVX512-BF16. Two
machines both reporting "AMD EPYC" may be different generations, so the family, model and stepping numbers and the
vector extensions are recorded too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional


__all__ = ["cpu_info"]

#: flag prefixes that choose CPU kernels in PyTorch and bitsandbytes (AVX512-BF16 repacks 4-bit weights on eval)
KERNEL_FLAG_PREFIXES = ("avx2", "avx512", "amx")


def cpu_info(cpuinfo: Optional[str] = None) -> dict[str, Any]:
    """The first CPU's model name, `family/model/stepping` and kernel-relevant flags, from `/proc/cpuinfo` (or the
    given text). Empty where that file does not exist (macOS, Windows)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        if not path.exists():
            return {}
        cpuinfo = path.read_text()
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    info: dict[str, Any] = {}
    if "model name" in fields:
        info["cpu_model"] = fields["model name"]
    numbers = [fields.get(key) for key in ("cpu family", "model", "stepping")]
    if all(numbers):
        info["cpu_family_model_stepping"] = "/".join(numbers)
    if "flags" in fields:
        info["cpu_flags"] = sorted(f for f in fields["flags"].split() if f.startswith(KERNEL_FLAG_PREFIXES))
    return info
