"""The quick start chain on this machine, as a new user gets it from `slmops quickstart`: wall time
of the whole journey (import, teacher answers, pruned student, report, LoRA, int4, served) and the
figures of its final report.

Run as: python bench/quickstart.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
TARGET_S = 15 * 60  # the issue: under 15 minutes on a 2-core CPU


def main() -> None:
    from studio import deploy, quickstart

    with tempfile.TemporaryDirectory(prefix="bench-quickstart-") as tmp:
        home = Path(tmp) / "home"
        env = {**os.environ, "STUDIO_HOME": str(home)}
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "studio.cli", "quickstart"], cwd=ROOT, env=env, text=True
        )
        wall = time.perf_counter() - started
        runs = quickstart.latest(home)
        try:
            if done.returncode != 0 or not runs:
                raise SystemExit(f"the quick start failed (exit {done.returncode})")
            report = quickstart.report(home, runs)
            served = deploy.serving(home, str(quickstart.onnx_folder(home, runs)))
        finally:
            for row in deploy.refresh(home):
                deploy.stop_server(home, row["id"])
    print(f"wall time {wall:.0f} s; {quickstart.format_report(report)}", flush=True)
    print(f"served: {'yes' if served else 'no'}", flush=True)
    print(f"BENCH quickstart_wall_s {wall:.0f} < {TARGET_S}")
    print(f"BENCH quickstart_int4_quality_kept_pct {report['int4_quality_kept_pct']} >= 95")
    print(f"BENCH quickstart_served {int(served is not None)} >= 1")


if __name__ == "__main__":
    main()
