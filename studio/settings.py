"""Settings read from the environment once per process (see the README's configuration table)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_QUEUES = {"compute": 1, "network": 4, "data": 2}


@dataclass(frozen=True)
class Settings:
    home: Path = field(default_factory=lambda: Path("studio-data"))
    host: str = "127.0.0.1"
    port: int = 7860
    queues: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_QUEUES))
    max_upload_mb: int = 200
    cancel_grace_s: float = 30.0

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
        )


def parse_queues(text: str) -> dict[str, int]:
    """'compute=1,network=4' -> {'compute': 1, 'network': 4}."""
    queues = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, limit = part.partition("=")
        if not limit.strip().isdigit() or int(limit) < 1:
            raise ValueError(f"STUDIO_QUEUES: '{part}' must look like name=N with N >= 1")
        queues[name.strip()] = int(limit)
    return queues
