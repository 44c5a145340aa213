"""Test setup: offline environment before anything imports transformers, and shared fixtures."""

import json
import os
import shutil
import tempfile

os.environ.update(
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    GRADIO_ANALYTICS_ENABLED="False",
    HF_HOME=tempfile.mkdtemp(prefix="hf-home-"),
    # the bundled model is converted once per test session, not once per test
    STUDIO_MODELS_DIR=tempfile.mkdtemp(prefix="slmops-models-"),
)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from studio import store  # noqa: E402
from studio.jobs import JobRunner  # noqa: E402

FAKESITE = Path(__file__).parent / "fakesite"


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    from tests.tiny import build_tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-tokenizer")
    build_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    store.init(home)
    monkeypatch.setenv("STUDIO_HOME", str(home))
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    return home


@pytest.fixture
def runner(home):
    return JobRunner(home, inline=True)


@pytest.fixture
def fake_steps(monkeypatch):
    """Register the fake step here and in every worker child (through tests/fakesite)."""
    from pipelines import STEPS
    from tests import fake_steps

    monkeypatch.setitem(STEPS, "fake", fake_steps)
    monkeypatch.setenv(
        "PYTHONPATH",
        os.pathsep.join(
            [str(FAKESITE), str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")]
        ),
    )
    return fake_steps


@pytest.fixture
def live_runner(home, fake_steps):
    """A real runner: children are `python -m studio.worker` processes."""
    runner = JobRunner(
        home, queues={"compute": 1, "network": 2, "data": 2}, grace_s=1.0, poll_s=0.05
    )
    assert runner.start()
    yield runner
    runner.stop()
    for proc in list(runner._procs.values()):
        if hasattr(proc, "kill"):
            proc.kill()
            proc.wait()


@pytest.fixture
def events():
    return []  # use events.append as the Reporter


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    from tests.tiny import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm"), seed=0)


@pytest.fixture(scope="session")
def bpe_lm(tmp_path_factory):
    """A tiny model with a byte-level BPE tokenizer, which ONNX Runtime GenAI can read."""
    from tests.tiny import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("bpe-lm"), hidden_size=64, bpe=True)


@pytest.fixture(scope="session")
def tiny_onnx(bpe_lm, tmp_path_factory):
    """The tiny BPE model quantized to an int4 ONNX Runtime GenAI folder (no gate)."""
    from pipelines import quantize

    workdir = tmp_path_factory.mktemp("tiny-onnx")
    quantize.run(quantize.QuantizeConfig(model=str(bpe_lm), gate=False), workdir, lambda e: None)
    return workdir / "onnx"


@pytest.fixture
def made_onnx(home, tiny_onnx):
    """The tiny ONNX folder registered as an artifact of a quantize run in this home."""
    runner = JobRunner(home, inline=True)
    with store.connect(home) as db:
        run_id = store.create_run(
            db,
            "quantize",
            {"model": "bundled", "precision": "int4"},
            queue="compute",
            name="tiny int4",
        )
        store.set_status(db, run_id, "running")
        out = home / "runs" / run_id / "out"
        out.mkdir(parents=True)
        shutil.copytree(tiny_onnx, out / "onnx")
        store.register_artifacts(db, home, run_id, out, [("onnx", "onnx", {"name": "tiny int4"})])
        summary = {"recipe": "int4 k_quant_mixed b32", "gate": {"verdict": "pass", "checks": []}}
        store.set_status(db, run_id, "succeeded", summary_json=json.dumps(summary))
    return runner, out / "onnx"


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, tiny_lm):
    """A dataset folder as the dataset step writes it: mixed lengths, two labels."""
    from pipelines import dataset

    folder = tmp_path_factory.mktemp("tiny-data")
    rows = "".join(
        f'{{"text": "hello world {"the a " * (i % 9)}{i}", "label": '
        f'"{"good" if i % 2 else "bad"}"}}\n'
        for i in range(48)
    )
    (folder / "rows.jsonl").write_text(rows)
    dataset.run(
        dataset.DatasetConfig(
            name="tiny",
            files=[str(folder / "rows.jsonl")],
            tokenizer_model=str(tiny_lm),
            validation_ratio=0.25,
            train_ratio=0.75,
            test_ratio=0.0,
        ),
        folder,
        lambda event: None,
    )
    return folder / "dataset"
