"""Deploy: runtimes started and stopped from the store, the playground through the runtime and a
worker side by side, the benchmark run and `slmops bench-endpoint`, the Foundry Local package
(loaded by the real foundry-local-sdk in its own venv), and publishing to a Hub test double."""

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import gradio as gr
import pytest

from pipelines import publish
from pipelines.base import StepError
from studio import deploy, store
from studio.chat import ChatClient
from studio.ui import deploy_tab
from tests.hub_server import FakeHub

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_test_token_5d1e0c"  # searched for by value after each publish


def test_server_lifecycle_snippets_benchmark_and_card(made_onnx, home):
    runner, folder = made_onnx
    server_id = deploy.start_server(home, {"tiny": str(folder)}, api_key="sk-deploy")
    try:
        row = deploy.wait_serving(home, server_id)
        assert row["status"] == "serving" and row["key_required"] == 1 and row["pid"]
        with store.connect(home) as db:  # the key itself is never stored
            assert "sk-deploy" not in json.dumps(store.servers(db))
        url = deploy.url(row)
        reply = "".join(
            deploy.stream_chat(
                url, "tiny", [{"role": "user", "content": "hello"}], 8, api_key="sk-deploy"
            )
        )
        assert isinstance(reply, str)
        with pytest.raises(deploy.DeployError, match="401.*API key"):
            list(deploy.stream_chat(url, "tiny", [{"role": "user", "content": "hi"}], 4))
        text = deploy_tab.server_snippets(home, server_id)
        assert url in text and "OpenAI(" in text and "curl" in text and "Bearer YOUR_KEY" in text
        assert deploy.serving(home, str(folder))[1] == "tiny"
        with pytest.raises(deploy.DeployError, match="in use"):
            deploy.start_server(home, {"tiny": str(folder)}, port=row["port"])

        run_id, _ = deploy_tab.submit_benchmark(runner, None, server_id, 1, 8, "sk-deploy")
        with store.connect(home) as db:
            bench = store.get_run(db, run_id)
        assert bench["status"] == "succeeded", bench["error"]
        summary = json.loads(bench["summary_json"])
        assert summary["requests"] == 8 and summary["latency_p95_s"] >= summary["ttft_p95_s"] > 0
        assert summary["peak_memory_mb"] > 0 and "cores" in summary["hardware"]
        assert "sk-deploy" not in bench["config_json"]

        card = deploy_tab.preview_card(home, None, str(folder), "me/tiny-int4", "apache-2.0")
        assert "## Measured speed" in card and summary["hardware"] in card
        assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
        assert "base_model_relation: quantized" in card
    finally:
        assert deploy.stop_server(home, server_id)
    deadline = time.monotonic() + 15
    while deploy._alive(row["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not deploy._alive(row["pid"])
    assert deploy.refresh(home)[0]["status"] == "stopped"
    _assert_secret_nowhere(home, "sk-deploy")  # the server's log, the benchmark's, the card


def test_a_server_that_cannot_start_is_marked_failed(home, tmp_path):
    with pytest.raises(deploy.DeployError, match="quantize it first"):
        deploy.start_server(home, {"x": str(tmp_path)})
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "genai_config.json").write_text("{}")  # looks like ONNX, is not
    row = deploy.wait_serving(home, deploy.start_server(home, {"x": str(broken)}))
    assert row["status"] == "failed" and row["error"]


def test_playground_side_by_side_runtime_and_worker(made_onnx, home, tiny_lm):
    _, folder = made_onnx
    chat = ChatClient(home)
    try:
        updates = list(
            deploy_tab.chat_turn(
                home,
                chat,
                None,
                None,
                str(folder),
                str(tiny_lm),
                "Be brief.",
                "hello world",
                [],
                [],
                6,
                0.0,
                1.0,
                "",
            )
        )
        a, b, box = updates[-1]
        assert box == "" and [m["role"] for m in a] == ["user", "assistant"]
        assert [m["role"] for m in b] == ["user", "assistant"]
        served = deploy.serving(home, str(folder))
        assert served is not None  # the playground started a runtime for the ONNX model
        with pytest.raises(gr.Error, match="can't answer"):
            list(
                deploy_tab.chat_turn(
                    home, chat, None, None, str(home / "missing"), "", "", "hi", [], [], 4, 0.0
                )
            )
    finally:
        chat.close()
        for row in deploy.refresh(home):
            deploy.stop_server(home, row["id"])


def test_bench_endpoint_cli_reports_and_explains_unreachable(home, tiny_onnx, tmp_path):
    with FakeHub("x") as unused:  # a port that answers nothing OpenAI-like
        bad = subprocess.run(
            [sys.executable, "-m", "studio.cli", "bench-endpoint", unused.url, "--rounds", "1"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert bad.returncode == 1 and "answered 404" in bad.stderr
    closed = subprocess.run(
        [
            sys.executable,
            "-m",
            "studio.cli",
            "bench-endpoint",
            "http://127.0.0.1:9",
            "--rounds",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert closed.returncode == 1 and "Can't reach http://127.0.0.1:9/v1" in closed.stderr


# --- Foundry Local -----------------------------------------------------------------------


def test_foundry_package_has_the_files_and_the_models_template(made_onnx, home):
    runner, folder = made_onnx
    run_id, _ = deploy_tab.submit_foundry(runner, None, str(folder), "My Tiny Model!")
    with store.connect(home) as db:
        row = store.get_run(db, run_id)
    assert row["status"] == "succeeded", row["error"]
    header, text, archive = deploy_tab.foundry_status(home, run_id)
    package = Path(archive).parent / "my-tiny-model"
    names = {p.name for p in package.iterdir()}
    assert {
        "genai_config.json",
        "model.onnx",
        "model.onnx.data",
        "tokenizer.json",
        "inference_model.json",
        "README.md",
    } <= names
    with zipfile.ZipFile(archive) as z:
        assert {f"my-tiny-model/{n}" for n in names} | {"my-tiny-model/"} == set(z.namelist())
    spec = json.loads((package / "inference_model.json").read_text())
    assert spec["Name"] == "my-tiny-model"
    assert "foundry model run my-tiny-model" in text and "foundry cache cd" in text

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "good?"},
    ]
    assert publish.format_with_template(spec["PromptTemplate"], conversation) == (
        tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    )


def test_foundry_refuses_what_it_cannot_run(tiny_lm, tmp_path, tiny_onnx):
    config = publish.PublishConfig(source=str(tiny_lm), destination="foundry")
    with pytest.raises(StepError, match="quantize this model first"):
        publish.run(config, tmp_path, lambda e: None)
    separate = tmp_path / "separate"
    subprocess.run(["cp", "-r", str(tiny_onnx), str(separate)], check=True)
    (separate / "adapter_weights.onnx_adapter").write_bytes(b"x")
    config = publish.PublishConfig(source=str(separate), destination="foundry")
    with pytest.raises(StepError, match="adapter: merge"):
        publish.run(config, tmp_path / "w", lambda e: None)


FOUNDRY_CHECK = """
import json, sys
from foundry_local_sdk import (CatalogType, ChatSession, Configuration, FoundryLocalManager,
    MessageItem, ModelInfoBuilder, Request, RequestOptions, SearchOptions)
folder, work = sys.argv[1], sys.argv[2]
FoundryLocalManager.initialize(Configuration(app_name="slmops-test", model_cache_dir=work + "/c",
    app_data_dir=work + "/d", logs_dir=work + "/l", disable_nonessential_telemetry=True))
catalog = FoundryLocalManager.instance.get_catalog(CatalogType.LOCAL)
spec = json.load(open(folder + "/inference_model.json"))
with ModelInfoBuilder() as info:
    info.set_string_property("task", "chat-completion")
    model = catalog.register_model(model_path=folder, model_id=spec["Name"] + ":1", metadata=info)
model.load()
items = []
with ChatSession(model) as session:
    session.set_options(RequestOptions(search=SearchOptions(temperature=0.0, max_output_tokens=4)))
    with Request().add_item(MessageItem.user("hello world")) as request:
        with session.process_request(request) as response:
            items = [type(item).__name__ for item in response]
model.unload()
print(json.dumps({"id": model.id, "items": items}))
"""


@pytest.fixture(scope="session")
def foundry_python():
    """Python of a venv with foundry-local-sdk (it pins its own onnxruntime), made once."""
    venv = Path(os.environ.get("SLMOPS_FOUNDRY_VENV", Path.home() / ".cache/slmops/foundry-venv"))
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "foundry-local-sdk==2.2.1"],
            check=True,
            timeout=600,
        )
    return python


def test_foundry_local_sdk_loads_the_package(made_onnx, home, foundry_python, tmp_path):
    runner, folder = made_onnx
    run_id, _ = deploy_tab.submit_foundry(runner, None, str(folder), "")
    _, _, archive = deploy_tab.foundry_status(home, run_id)
    with zipfile.ZipFile(archive) as z:  # what the user downloads
        z.extractall(tmp_path / "models")
    package = next((tmp_path / "models").iterdir())
    done = subprocess.run(
        [str(foundry_python), "-c", FOUNDRY_CHECK, str(package), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["id"] == f"{package.name}:1" and result["items"] == ["MessageItem"]


# --- Hugging Face Hub --------------------------------------------------------------------


@pytest.fixture
def hub(monkeypatch):
    """The Hub test double (tests/hub_server.py) as HF_ENDPOINT, with offline mode lifted."""
    import huggingface_hub.constants

    with FakeHub(TOKEN) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        yield fake


def test_publish_sends_exactly_the_files_and_the_card(made_onnx, home, hub):
    runner, folder = made_onnx
    run_id, _ = deploy_tab.submit_publish(
        runner, None, str(folder), "tester/tiny-int4", True, "apache-2.0", TOKEN
    )
    with store.connect(home) as db:
        row = store.get_run(db, run_id)
    assert row["status"] == "succeeded", row["error"]
    assert hub.repos == {"tester/tiny-int4": {"type": "model", "private": True}}
    assert len(hub.commits) == 1  # the files and their card land together
    sent = hub.files["tester/tiny-int4"]
    assert set(sent) == {p.name for p in folder.iterdir()} | {"README.md"}
    for name, content in sent.items():
        if name != "README.md":
            assert content == (folder / name).read_bytes()
    card = sent["README.md"].decode()
    assert card == (home / "runs" / run_id / "out" / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: onnxruntime-genai" in card
    assert "license: apache-2.0" in card and "slmops-studio" in card
    assert "## How it was made" in card and "int4 k_quant_mixed b32" in card
    assert "onnxruntime_genai" in card and "from openai import OpenAI" in card
    assert str(home) not in card  # no path of this machine
    _assert_secret_nowhere(home, TOKEN)


def test_publish_with_a_wrong_token_says_so_and_changes_nothing(made_onnx, home, hub):
    runner, folder = made_onnx
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    run_id, _ = deploy_tab.submit_publish(
        runner, None, str(folder), "tester/x", True, "mit", "hf_bad"
    )
    with store.connect(home) as db:
        row = store.get_run(db, run_id)
    assert row["status"] == "failed"
    assert "refused the token (401" in row["error"] and "write access" in row["error"]
    assert hub.repos == {} and hub.commits == []
    assert before == {p.name: p.read_bytes() for p in folder.iterdir()}
    _assert_secret_nowhere(home, "hf_bad")


def test_publish_form_checks_before_queueing(made_onnx, home):
    runner, folder = made_onnx
    with pytest.raises(gr.Error, match="repo_id"):
        deploy_tab.submit_publish(runner, None, str(folder), "no-slash", True, "mit", "")
    with pytest.raises(gr.Error, match="Pick an artifact"):
        deploy_tab.submit_publish(runner, None, "", "me/x", True, "mit", "")


def _assert_secret_nowhere(home: Path, secret: str) -> None:
    """Search the database and every file of the studio for the secret's value."""
    for path in home.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    with store.connect(home) as db:
        for table in db.table_names():
            for row in db[table].rows:
                assert secret not in json.dumps(row, default=str), table


def test_publish_a_dataset_as_a_dataset_repo_with_its_card(tiny_dataset, home, hub, runner):
    run_id, _ = deploy_tab.submit_publish(
        runner, None, str(tiny_dataset), "tester/tiny-data", False, "mit", TOKEN
    )
    with store.connect(home) as db:
        row = store.get_run(db, run_id)
    assert row["status"] == "succeeded", row["error"]
    assert hub.repos == {"tester/tiny-data": {"type": "dataset", "private": False}}
    sent = hub.files["tester/tiny-data"]
    assert {"train.jsonl", "validation.jsonl", "README.md"} <= set(sent)
    assert sent["README.md"] == (tiny_dataset / "README.md").read_bytes()
    _assert_secret_nowhere(home, TOKEN)
