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
    assert "360 kept" in result.stdout and "Tokens per row (" in result.stdout


@pytest.mark.parametrize("command", ["finetune", "quantize", "dataset import", "bench-endpoint"])
def test_every_config_field_is_a_flag_with_its_help(command):
    """Flags come from the config dataclasses (name, type, help), so none can drift from them."""
    import dataclasses

    from pipelines.benchmark import BenchmarkConfig
    from pipelines.dataset import DatasetConfig
    from pipelines.finetune import FinetuneConfig
    from pipelines.quantize import QuantizeConfig
    from studio.cli import _parser

    config, positional = {
        "finetune": (FinetuneConfig, ()),
        "quantize": (QuantizeConfig, ("extra_options",)),
        "dataset import": (
            DatasetConfig,
            ("files", "train_ratio", "validation_ratio", "test_ratio"),
        ),
        "bench-endpoint": (BenchmarkConfig, ("url",)),
    }[command]
    parser = _parser()
    sub = parser._subparsers._group_actions[0].choices[command.split()[0]]
    if " " in command:
        sub = sub._subparsers._group_actions[0].choices["import"]
    flags = {a.dest: a for a in sub._actions}
    for f in dataclasses.fields(config):
        if f.name in positional or f.name == "test_ratio":  # --split sets the shares
            continue
        action = flags[f"config_{f.name}"]
        assert f"--{f.name}" in action.option_strings
        assert f.metadata["help"] in action.help


def test_flags_are_typed_and_checked_by_the_config(tmp_path):
    result = slmops(tmp_path / "home", "finetune", "--dataset", str(tmp_path), "--lora_r", "x")
    assert result.returncode == 2 and "invalid int value: 'x'" in result.stderr
    result = slmops(tmp_path / "home", "finetune", "--dataset", str(tmp_path), "--lora_r", "0")
    assert result.returncode == 2 and "lora_r must be >= 1, got 0" in result.stderr
    result = slmops(tmp_path / "home", "quantize", "-m", "bundled", "-p", "fp16", "--detach")
    assert result.returncode == 2 and "precision fp16 is not offered for cpu" in result.stderr
