"""Hosted mode: what each user may queue and read (their own runs and files, within limits)."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from sqlite_utils import Database

from pipelines.dataset import SAMPLE_DATASET
from pipelines.lib.models import bundled_gguf, models_dir
from studio import store
from studio.settings import Limits


class LimitReached(ValueError):
    """A hosted user asked for more than the studio allows; the message says what to change."""


def check_room(db: Database, limits: Limits, owner: str, runs: int) -> None:
    """LimitReached unless the owner may queue `runs` more runs (a chain queues several)."""
    active = store.active_runs(db, owner)
    if limits.queued_runs and active + runs > limits.queued_runs:
        raise LimitReached(
            f"You have {active} runs queued or running, and this shared studio runs at most "
            f"{limits.queued_runs} per user at once"
            + (f" (this needs {runs})" if runs > 1 else "")
            + ". Wait for one to finish, or cancel one in the Runs tab."
        )


def check_submit(
    db: Database,
    home: Path,
    limits: Limits,
    owner: str,
    step: str,
    config: dict[str, Any],
    room: int = 1,
) -> dict[str, Any]:
    """Raise LimitReached (or PermissionError for someone else's files) unless the owner may
    queue `room` runs like this one; returns the config with the row limit applied."""
    if room:
        check_room(db, limits, owner, room)
    steps = config.get("max_steps")
    if limits.train_steps and step == "finetune" and not 0 < (steps or 0) <= limits.train_steps:
        raise LimitReached(
            f"This shared studio trains at most {limits.train_steps} steps per run: set Max "
            f"steps to {limits.train_steps} or less"
            + (" (it is 0, which trains whole epochs)." if not steps else f" (it is {steps}).")
        )
    check_paths(db, home, owner, config)
    for key in URL_FIELDS:
        if config.get(key):
            check_url(db, owner, config[key])
    if step == "dataset" and limits.rows and not 0 < config.get("max_rows", 0) <= limits.rows:
        config = {**config, "max_rows": limits.rows}
    return config


def check_paths(db: Database, home: Path, owner: str, config: dict[str, Any]) -> None:
    """Every local path in a config must be the owner's (their runs and uploads), the bundled
    model, the sample dataset or the converted-models cache."""
    home = Path(home).resolve()
    shared = [models_dir(), SAMPLE_DATASET.parent.resolve()]
    if bundled_gguf() is not None:
        shared.append(bundled_gguf().parent.resolve())
    own_uploads = store.uploads_dir(home, owner).resolve()
    for value in _strings(config):
        try:  # resolved first: "//..//x", symlinks and ".." are judged by where they lead
            path = Path(value).expanduser().resolve()
            exists = path.exists()
        except (OSError, RuntimeError, ValueError):
            continue  # longer than any path the system opens, or with a NUL: names no file
        if any(path == root or root in path.parents for root in [*shared, own_uploads]):
            continue
        if home in path.parents or path == home:
            run_id = store.run_of_path(home, path)
            if run_id and store.get_run(db, run_id, owner):
                continue
        elif not exists:
            continue  # not a local path: a Hub id, a URL, a prompt
        raise PermissionError(
            f"'{value}' is not yours to use: on this shared studio a run reads only your own "
            "datasets and models, the bundled model and the sample dataset."
        )


URL_FIELDS = ("endpoint", "url")  # the teacher's endpoint (synthesize, evaluate), benchmark's url


def check_url(db: Database, owner: str, url: str) -> None:
    """A URL a run or a connection test will fetch must lead to the public internet, or to a
    runtime this owner serves here: never to this machine's other services, the host's network
    or a cloud metadata address (loopback, private, link-local, reserved)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise PermissionError(f"'{url}' must be an http:// or https:// address")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parsed.hostname, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        return  # it resolves to nothing: the step says it is unreachable
    addresses = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}
    if all(a.is_global for a in addresses):
        return
    own = {server["port"] for server in store.servers(db, live_only=True, owner=owner)}
    if all(a.is_loopback for a in addresses) and port in own:
        return  # the owner's own model, served here
    raise PermissionError(
        f"'{url}' leads into this machine or its network ({', '.join(map(str, addresses))}): "
        "on this shared studio a teacher or a benchmark must be a public endpoint, or a model "
        "you serve here (Deploy → Serve)."
    )


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if value else []  # every string: a newline or a length hides no path
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []
