"""The machine in a few words (CPU model, cores, GPU), for reports and model cards."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path


def hardware() -> str:
    """The machine in a few words, for reports and model cards: CPU model, cores, GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores"
    try:
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        if gpu:
            text += f", {gpu.splitlines()[0]}"
    except (OSError, subprocess.SubprocessError):
        pass
    return text


def gpu_free_bytes() -> int | None:
    """Free memory of the first GPU from nvidia-smi (None without one); the web process asks
    this instead of loading torch."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout
        return int(out.split()[0]) * 2**20
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None
