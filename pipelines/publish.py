"""The `publish` step: push a dataset, an adapter, a model or an ONNX folder to the Hugging Face
Hub with a lineage model card, or package an ONNX folder for Foundry Local (inference_model.json
with the model's own chat template, and a zip).

The token comes from the environment (STUDIO_HF_TOKEN, set by the studio from its password field,
or HF_TOKEN) and is never written anywhere. HF_ENDPOINT is respected.
Run alone: python -m pipelines.publish --config cfg.json --workdir DIR
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipelines.base import Log, Progress, Reporter, StepError, StepResult, main, option
from pipelines.lib.card import check_card, model_card

TOKEN_ENV = "STUDIO_HF_TOKEN"  # where the studio puts a token typed into the UI
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
CONTENT = "{Content}"
SKIP = {"report.json", "builder.log", "README.md"}  # the card replaces README.md


@dataclass(frozen=True)
class PublishConfig:
    source: str = option("", "Artifact", "The folder to publish: dataset, adapter, model or ONNX.")
    destination: Literal["hub", "foundry"] = option(
        "hub",
        "Destination",
        "hub: a Hugging Face Hub repo with a model card. foundry: a folder and zip that "
        "Foundry Local loads (ONNX models only).",
    )
    repo_id: str = option("", "Repo id", "user/name (or org/name) on the Hub.")
    private: bool = option(True, "Private", "Create the Hub repo as private.")
    license: str = option(
        "apache-2.0", "License", "The card's license (a derived model keeps its base's terms)."
    )
    name: str = option("", "Name", "The Foundry Local model name; empty uses the artifact's.")
    kind: Literal["", "dataset", "adapter", "model", "onnx"] = option(
        "", "Kind", "What the artifact is; empty finds out from its files."
    )
    lineage: dict = option(
        {},
        "Lineage",
        "How the artifact was made (the studio fills this from its runs); it becomes the card.",
    )

    def __post_init__(self) -> None:
        if not self.source or not Path(self.source).is_dir():
            raise ValueError(f"source: '{self.source}' is not a folder; pick an artifact")
        if self.destination == "hub" and not REPO_ID.match(self.repo_id):
            raise ValueError(
                f"repo_id: '{self.repo_id}' must look like user/name (letters, digits, - _ .)"
            )

    @property
    def queue(self) -> str:
        return "network"

    @property
    def outputs(self) -> dict[str, str]:
        """hub: the card it pushed; foundry: foundry/<name>/ and foundry/<name>.zip."""
        return {"README.md": "card"} if self.destination == "hub" else {"foundry": "foundry"}


CONFIG = PublishConfig


def kind_of(folder: Path) -> str:
    """What a folder holds, from its files."""
    if (folder / "genai_config.json").exists():
        return "onnx"
    if (folder / "adapter_config.json").exists():
        return "adapter"
    if (folder / "config.json").exists():
        return "model"
    if any(folder.glob("*.jsonl")) or any(folder.glob("*.parquet")):
        return "dataset"
    raise StepError(f"{folder} holds no dataset, adapter, model or ONNX files")


def run(config: PublishConfig, workdir: Path, report: Reporter) -> StepResult:
    source = Path(config.source)
    kind = config.kind or kind_of(source)
    lineage = config.lineage or _bare_lineage(source, kind)
    if config.destination == "foundry":
        return _foundry(config, source, kind, lineage, workdir, report)
    return _hub(config, source, kind, lineage, workdir, report)


# --- Hugging Face Hub ------------------------------------------------------------------------


def _hub(config, source: Path, kind: str, lineage, workdir: Path, report: Reporter) -> StepResult:
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    card = _card(config, source, kind, lineage)
    (workdir / "README.md").write_text(card, encoding="utf-8")
    report(Log(f"model card written and checked ({len(card)} characters)"))
    files = _files(source)
    size_mb = sum(f.stat().st_size for f in files) / 2**20
    report(Progress(1, 4, f"{len(files)} files, {size_mb:.1f} MB"))
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=_token())
    repo_type = "dataset" if kind == "dataset" else "model"
    try:
        user = api.whoami()["name"]
        report(Log(f"signed in to {api.endpoint} as {user}"))
        report(Progress(2, 4, f"creating {repo_type} repo {config.repo_id}"))
        url = api.create_repo(
            config.repo_id, private=config.private, repo_type=repo_type, exist_ok=True
        )
        report(Progress(3, 4, "uploading"))
        commit = api.create_commit(  # one commit: the files and their card land together
            config.repo_id,
            repo_type=repo_type,
            operations=[
                *(CommitOperationAdd(str(f.relative_to(source)), str(f)) for f in files),
                CommitOperationAdd("README.md", card.encode()),
            ],
            commit_message=f"Upload {kind} with its lineage card from SLMOps Studio",
        )
    except HfHubHTTPError as e:
        raise StepError(_hub_error(e, config.repo_id, api.endpoint)) from None
    except OSError as e:  # connection refused, DNS, offline mode
        raise StepError(
            f"Can't reach the Hub at {api.endpoint}: {e}. Check the network (or HF_ENDPOINT) "
            "and try again; nothing was changed here."
        ) from None
    published = {
        "url": str(url),
        "repo_id": config.repo_id,
        "repo_type": repo_type,
        "private": config.private,
        "commit": getattr(commit, "oid", None),
        "files": [str(f.relative_to(source)) for f in files] + ["README.md"],
        "endpoint": api.endpoint,
    }
    (workdir / "published.json").write_text(json.dumps(published, indent=2))
    report(Progress(4, 4, f"published at {url}"))
    return StepResult(
        artifacts=[("card", "README.md", {"name": f"card of {config.repo_id}", "url": str(url)})],
        summary=published,
    )


def _token() -> str | None:
    """The studio's token, else huggingface_hub's own lookup (HF_TOKEN, a saved login)."""
    return os.environ.get(TOKEN_ENV) or None


def _hub_error(e: Any, repo_id: str, endpoint: str) -> str:
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status == 401:
        return (
            f"The Hub at {endpoint} refused the token (401 Unauthorized). Paste a token with "
            "write access from https://huggingface.co/settings/tokens (or set HF_TOKEN) and try "
            "again; nothing was uploaded."
        )
    if status == 403:
        return (
            f"The token may not write to '{repo_id}' (403 Forbidden): use a token with write "
            "access, or a repo id under your own name."
        )
    return f"The Hub at {endpoint} refused the upload ({status}): {e}"


def _card(config, source: Path, kind: str, lineage: dict[str, Any]) -> str:
    repo_id = config.repo_id or f"local/{_foundry_name(config, lineage)}"
    if kind == "dataset" and (source / "README.md").exists():
        return (source / "README.md").read_text(encoding="utf-8")  # the import's dataset card
    card = model_card(lineage, repo_id, config.license)
    check_card(card)
    return card


def _files(source: Path) -> list[Path]:
    return sorted(p for p in source.rglob("*") if p.is_file() and p.name not in SKIP)


def _bare_lineage(source: Path, kind: str) -> dict[str, Any]:
    """For a folder made outside the studio: the card can only tell what the folder holds."""
    files = _files(source)
    return {
        "artifact": {
            "kind": kind,
            "name": source.name,
            "bytes": sum(f.stat().st_size for f in files),
            "sha256": "n/a (not made by the studio)",
            "meta": {},
        },
        "runs": [],
        "measured": [],
    }


# --- Foundry Local ---------------------------------------------------------------------------


def _foundry(config, source: Path, kind: str, lineage, workdir: Path, report: Reporter):
    if kind != "onnx":
        raise StepError(
            "Foundry Local runs ONNX Runtime GenAI folders: quantize this model first "
            "(Quantize tab), then package the ONNX model."
        )
    if (source / "adapter_weights.onnx_adapter").exists():
        raise StepError(
            "This ONNX model keeps its LoRA adapter in a separate file, which Foundry Local "
            "does not load (it would run the base model). Quantize with 'adapter: merge' and "
            "package that."
        )
    name = _foundry_name(config, lineage)
    package = workdir / "foundry" / name
    shutil.rmtree(package.parent, ignore_errors=True)
    package.mkdir(parents=True)
    report(Progress(1, 3, f"copying the ONNX files into {name}/"))
    for f in _files(source):
        target = package / f.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
    template = prompt_template(source)
    (package / "inference_model.json").write_text(
        json.dumps({"Name": name, "PromptTemplate": template}, indent=2) + "\n"
    )
    card = _card(config, source, kind, lineage)
    (package / "README.md").write_text(card + "\n" + foundry_commands(name), encoding="utf-8")
    report(Progress(2, 3, "zipping"))
    archive = shutil.make_archive(str(workdir / "foundry" / name), "zip", package.parent, name)
    report(Log(foundry_commands(name)))
    report(Progress(3, 3, f"packaged {name} for Foundry Local"))
    return StepResult(
        artifacts=[
            ("foundry", f"foundry/{name}", {"name": name}),
            ("foundry-zip", f"foundry/{Path(archive).name}", {"name": f"{name}.zip"}),
        ],
        summary={"name": name, "prompt_template": template, "zip": Path(archive).name},
    )


def foundry_commands(name: str) -> str:
    return (
        "## Run it with Foundry Local\n\n"
        "```bash\n"
        f"unzip {name}.zip -d ./models      # makes ./models/{name}/\n"
        "foundry cache cd ./models          # point Foundry Local's cache at that folder\n"
        f"foundry cache ls                   # lists {name}\n"
        f"foundry model run {name}\n"
        "```\n\n"
        "Or, with the Foundry Local Python SDK (`pip install foundry-local-sdk`), register the "
        "folder in the local catalog:\n\n"
        "```python\n"
        "from foundry_local_sdk import CatalogType, Configuration, FoundryLocalManager, "
        "ModelInfoBuilder\n\n"
        'FoundryLocalManager.initialize(Configuration(app_name="my-app"))\n'
        "catalog = FoundryLocalManager.instance.get_catalog(CatalogType.LOCAL)\n"
        "with ModelInfoBuilder() as info:\n"
        '    info.set_string_property("task", "chat-completion")\n'
        f'    model = catalog.register_model(model_path="./models/{name}", model_id="{name}:1", '
        "metadata=info)\n"
        "model.load()\n"
        "```\n"
    )


def _foundry_name(config, lineage: dict[str, Any]) -> str:
    raw = config.name or lineage.get("artifact", {}).get("name") or Path(config.source).name
    name = re.sub(r"[^a-z0-9.]+", "-", raw.lower()).strip("-.")
    return name or "model"


def prompt_template(folder: Path) -> dict[str, str]:
    """Foundry Local's PromptTemplate (system, user, assistant, prompt with {Content}), cut out
    of the model's own chat template rendered around marker texts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not tokenizer.chat_template:
        raise StepError(f"{folder} has no chat template: Foundry Local needs one to build prompts")
    marks = {role: f"{role.upper()}_MARK_7f3" for role in ("system", "user", "assistant")}

    def render(roles: list[str], generation_prompt: bool = False) -> str:
        messages = [{"role": r, "content": marks[r]} for r in roles]
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    system = render(["system"])
    with_user = render(["system", "user"])
    with_answer = render(["system", "user", "assistant"])
    asked = render(["system", "user"], generation_prompt=True)
    if not (with_user.startswith(system) and with_answer.startswith(with_user)):
        raise StepError(
            "this model's chat template does not build a conversation turn by turn, so Foundry "
            "Local's per-role PromptTemplate can't express it"
        )
    parts = {
        "system": system,
        "user": with_user[len(system) :],
        "assistant": with_answer[len(with_user) :],
        "prompt": with_user[len(system) :] + asked[len(with_user) :],
    }
    return {
        key: text.replace(marks["system"], CONTENT)
        .replace(marks["user"], CONTENT)
        .replace(marks["assistant"], CONTENT)
        for key, text in parts.items()
    }


def format_with_template(template: dict[str, str], messages: list[dict[str, str]]) -> str:
    """A conversation as Foundry Local builds it from the PromptTemplate (last user -> prompt)."""
    out = []
    for i, m in enumerate(messages):
        last_user = i == len(messages) - 1 and m["role"] == "user"
        out.append(template["prompt" if last_user else m["role"]].replace(CONTENT, m["content"]))
    return "".join(out)


if __name__ == "__main__":
    main(PublishConfig, run)
