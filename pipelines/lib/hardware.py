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
    gpu = _nvidia_smi("name")
    if gpu:
        text += f", {gpu.splitlines()[0]}"
    return text


def gpu_free_bytes() -> int | None:
    """Free memory of the first GPU from nvidia-smi (None without one); the web process asks
    this instead of loading torch."""
    try:
        return int(_nvidia_smi("memory.free", "nounits").split()[0]) * 2**20
    except (ValueError, IndexError):
        return None


def _nvidia_smi(field: str, *formats: str) -> str:
    """One field of `nvidia-smi --query-gpu` ('' without an NVIDIA GPU or its tool)."""
    if shutil.which("nvidia-smi") is None:
        return ""
    try:
        return subprocess.run(
            [
                "nvidia-smi",
                f"--query-gpu={field}",
                "--format=" + ",".join(["csv", "noheader", *formats]),
            ],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
