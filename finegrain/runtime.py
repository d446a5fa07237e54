"""Where code runs: CUDA when present, else CPU; autocast choices that follow the device."""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch


def default_device() -> torch.device:
    """CUDA when a GPU is visible, else CPU: every command uses this unless told otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    return bool(getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")() in {"AVX512_BF16", "AMX"}) or _cpuinfo_has_bf16()


def _cpuinfo_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager:
    """Autocast to `dtype` on `device`, or a no-op context when dtype is None (FP32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
