"""Settings read from the environment once per process (see the README's configuration table)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_QUEUES = {"compute": 1, "network": 4, "data": 2}
TRUE = ("1", "true", "yes", "on")
# environment variables a hosted studio keeps from the processes it starts (runs, servers, chat):
# the host's tokens and keys must not serve its visitors
SECRET_MARKERS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "STUDIO_USERS")


@dataclass(frozen=True)
class Limits:
    """What one user of a hosted studio may do (0 = no limit)."""

    upload_mb: int = 20
    rows: int = 2000
    train_steps: int = 300
    queued_runs: int = 8
    servers: int = 1

    @classmethod
    def from_env(cls) -> Limits:
        env, default = os.environ, cls()
        return cls(
            upload_mb=int(env.get("STUDIO_LIMIT_UPLOAD_MB", default.upload_mb)),
            rows=int(env.get("STUDIO_LIMIT_ROWS", default.rows)),
            train_steps=int(env.get("STUDIO_LIMIT_STEPS", default.train_steps)),
            queued_runs=int(env.get("STUDIO_LIMIT_RUNS", default.queued_runs)),
            servers=int(env.get("STUDIO_LIMIT_SERVERS", default.servers)),
        )


@dataclass(frozen=True)
class Settings:
    home: Path = field(default_factory=lambda: Path("studio-data"))
    host: str = "127.0.0.1"
    port: int = 7860
    queues: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_QUEUES))
    max_upload_mb: int = 200
    cancel_grace_s: float = 30.0
    # hosted mode (a shared studio): sign-in, each user's own runs, per-user limits
    limits: Limits | None = None
    users: dict[str, str] = field(default_factory=dict, repr=False)  # name -> password

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        return cls(
            home=Path(env.get("STUDIO_HOME", "studio-data")).expanduser().resolve(),
            host=env.get("STUDIO_HOST", "127.0.0.1"),
            port=int(env.get("STUDIO_PORT", "7860")),
            queues={**DEFAULT_QUEUES, **parse_queues(env.get("STUDIO_QUEUES", ""))},
            max_upload_mb=int(env.get("STUDIO_MAX_UPLOAD_MB", "200")),
            cancel_grace_s=float(env.get("STUDIO_CANCEL_GRACE", "30")),
            limits=Limits.from_env() if hosted() else None,
            users=parse_users(env.get("STUDIO_USERS", "")),
        )


def hosted() -> bool:
    """STUDIO_HOSTED=1: a shared studio (the Space image sets it)."""
    return os.environ.get("STUDIO_HOSTED", "").lower() in TRUE


def child_environ(**extra: str) -> dict[str, str]:
    """The environment of a process the studio starts; a hosted studio leaves out its secrets."""
    env = dict(os.environ)
    if hosted():
        env = {k: v for k, v in env.items() if not any(m in k.upper() for m in SECRET_MARKERS)}
    return {**env, **extra}


def parse_users(text: str) -> dict[str, str]:
    """'alice:pw1,bob:pw2' -> {'alice': 'pw1', 'bob': 'pw2'} (the passwords stay in memory)."""
    users = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, password = part.partition(":")
        if not sep or not name.strip() or not password:
            raise ValueError("STUDIO_USERS: each entry must look like name:password")
        users[name.strip()] = password
    return users


def parse_queues(text: str) -> dict[str, int]:
    """'compute=1,network=4' -> {'compute': 1, 'network': 4}."""
    queues = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, limit = part.partition("=")
        if not limit.strip().isdigit() or int(limit) < 1:
            raise ValueError(f"STUDIO_QUEUES: '{part}' must look like name=N with N >= 1")
        queues[name.strip()] = int(limit)
    return queues
