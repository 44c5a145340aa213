"""The slmops command line, run as a real subprocess on a fresh home."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.dataset import SAMPLE_DATASET

ROOT = Path(__file__).resolve().parent.parent


def slmops(home, *args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "studio.cli", "--home", str(home), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_dataset_import_prints_the_report_and_runs_shows_it(tmp_path, tiny_tokenizer_dir):
    home = tmp_path / "home"
    result = slmops(
        home,
        "dataset",
        "import",
        str(SAMPLE_DATASET),
        "--name",
        "support",
        "--tokenizer-model",
        str(tiny_tokenizer_dir),
        "--split",
        "0.8,0.1,0.1",
    )
    assert result.returncode == 0, result.stderr
    assert "360 rows read · 360 kept" in result.stdout
    assert "Splits: train 288, validation 36, test 36" in result.stdout
    listed = slmops(home, "runs")
    run_id = listed.stdout.splitlines()[1].split()[0]
    assert "succeeded" in listed.stdout
    shown = slmops(home, "show", run_id)
    assert "artifact: dataset support" in shown.stdout and '"seed": 42' in shown.stdout
    config = home / "runs" / run_id / "config.json"
    again = slmops(home, "run", "dataset", "--config", str(config), "--follow")
    assert again.returncode == 0 and "succeeded" in again.stdout


def test_failed_import_exits_non_zero_with_the_message(tmp_path, tiny_tokenizer_dir):
    bad = tmp_path / "notes.csv"
    bad.write_text("foo,bar\n1,2\n")
    result = slmops(
        tmp_path / "home",
        "dataset",
        "import",
        str(bad),
        "--name",
        "bad",
        "--tokenizer-model",
        str(tiny_tokenizer_dir),
    )
    assert result.returncode == 1
    assert "can't tell the shape" in result.stderr and "notes.csv" in result.stderr
    result = slmops(tmp_path / "home", "dataset", "import", "missing.csv", "--name", "x")
    assert result.returncode == 2 and "missing.csv: file not found" in result.stderr


def test_cancel_and_show_unknown_runs(tmp_path):
    assert slmops(tmp_path / "home", "show", "nope").returncode == 1
    result = slmops(tmp_path / "home", "cancel", "nope")
    assert result.returncode == 1 and "no run nope" in result.stderr


@pytest.mark.slow
def test_import_with_the_bundled_tokenizer_end_to_end(tmp_path):
    """The real path a user takes: the default (bundled SmolLM2) tokenizer and chat template."""
    result = slmops(
        tmp_path / "home",
        "dataset",
        "import",
        str(SAMPLE_DATASET),
        "--name",
        "support",
        "--system-prompt",
        "Classify the message.",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "kept: 360" in result.stdout and "tokens per row: min 2" in result.stdout
