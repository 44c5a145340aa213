"""Child processes of the studio (workers, runtimes, the chat process): started with the project on
their path and the host's secrets kept out, detached in their own session when they must outlive
the web process; checked alive by pid and command line; stopped as a group; their log's tail."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

from studio.settings import child_environ

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def start(
    module_args: list[str],
    *,
    log_path: Path,
    detached: bool = True,
    pipes: bool = False,
    **env: str,
) -> subprocess.Popen:
    """`python -m <module_args>` with its output (or, with `pipes`, its stderr) appended to
    `log_path`; `detached` puts it in a session of its own (it outlives a restart of the web
    process and is signalled as a group). `env` adds variables (a run's secrets) to the child's
    environment, which holds none of the host's."""
    environ = child_environ(**env)
    environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])
    )
    environ.setdefault("PYTHONUNBUFFERED", "1")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:  # the child keeps its own handle
        streams: dict[str, Any] = (
            {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": log, "text": True}
            if pipes
            else {"stdin": subprocess.DEVNULL, "stdout": log, "stderr": subprocess.STDOUT}
        )
        return subprocess.Popen(
            [sys.executable, "-m", *module_args],
            env=environ,
            cwd=PROJECT_ROOT,
            start_new_session=detached,
            bufsize=1 if pipes else -1,
            **streams,
        )


def alive(pid: int | None, *markers: str) -> bool:
    """Is `pid` a live (not zombie) process whose command line holds every marker? (A reused
    pid runs some other command.)"""
    if not pid:
        return False
    try:
        process = psutil.Process(pid)
        command = process.cmdline()
        return process.status() != psutil.STATUS_ZOMBIE and all(m in command for m in markers)
    except psutil.Error:
        return False


def signal_group(pid: int, sig: int = signal.SIGTERM) -> None:
    """Signal a detached child and everything it started (its group id is its pid)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def log_tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log (read from its last 20 kB); '' when there is none."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 20000))
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])
    except OSError:
        return ""
