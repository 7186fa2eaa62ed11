"""What machine a measurement ran on, for benchmark records: timings are comparable only on the same CPU."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_info() -> dict:
    """``{"machine", "cpu_count", "model_name", "flags"}`` (``/proc/cpuinfo``'s first CPU; model and flags absent
    where that file is not readable). The flags say which SIMD paths exist: avx2 / fma, avx512f, avx512_vnni, ..."""
    info: dict = {"machine": platform.machine(), "cpu_count": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and "model_name" not in info:
            info["model_name"] = value.strip()
        if key.strip() == "flags" and "flags" not in info:
            info["flags"] = value.split()
    return info
