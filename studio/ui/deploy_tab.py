"""Deploy tab: serve ONNX models on this machine (endpoint, snippets, benchmark), chat with any
model in the playground (side by side), package for Foundry Local, publish to the Hugging Face Hub
with a lineage model card."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from pipelines.benchmark import BenchmarkConfig
from pipelines.lib.card import check_card, model_card
from pipelines.lib.onnx_model import is_onnx_folder
from pipelines.publish import TOKEN_ENV, PublishConfig, foundry_commands, kind_of
from studio import deploy, quota, store
from studio.chat import ChatClient, ChatError
from studio.deploy import DeployError
from studio.jobs import JobRunner
from studio.quota import LimitReached
from studio.settings import Limits
from studio.store import RunStatus
from studio.ui import choices, runs_tab, session

SERVER_HEADERS = ["server", "models", "endpoint", "status", "pid", "started"]


def build_tab(home: Path, runner: JobRunner, chat: ChatClient) -> dict[str, Any]:
    """The tab; returns its sub-tabs and the playground's model A (the quick start opens them)."""
    with gr.Tabs() as tabs:
        with gr.Tab("Serve", id="deploy-serve"):
            _serve_section(home, runner)
        with gr.Tab("Playground", id="deploy-playground"):
            model_a = _playground_section(home, chat, runner.limits)
        with gr.Tab("Foundry Local", id="deploy-foundry"):
            _foundry_section(home, runner)
        with gr.Tab("Hugging Face Hub", id="deploy-hub"):
            _hub_section(home, runner)
    return {"tabs": tabs, "model_a": model_a}


# --- serve -----------------------------------------------------------------------------------


def _serve_section(home: Path, runner: JobRunner) -> None:
    limits, nobody = runner.limits, session.page_owner(runner.limits)
    gr.Markdown(
        "Serve quantized (ONNX) models on this machine behind an **OpenAI-compatible API**: "
        "any OpenAI client, LangChain or curl can use them. The server keeps running when "
        "you close the tab or restart the studio."
    )
    with gr.Row():
        models = gr.Dropdown(
            label="ONNX models",
            choices=choices.onnx_models(home, nobody),
            multiselect=True,
            info="Several at once share one endpoint, each under its own name.",
            elem_id="serve-models",
            scale=3,
        )
        port = gr.Number(label="Port", value=None, precision=0, info="Empty: the first free.")
        key = gr.Textbox(
            label="API key (optional)",
            type="password",
            info="Clients must send it; it is never stored.",
            elem_id="serve-key",
        )
    start = gr.Button("Start serving", variant="primary", elem_id="serve-start")
    table = gr.Dataframe(headers=SERVER_HEADERS, interactive=False, elem_id="servers", value=None)
    with gr.Row():
        chosen = gr.Dropdown(label="Server", choices=[], elem_id="serve-chosen", scale=2)
        stop = gr.Button("Stop", variant="stop", size="sm")
    snippet = gr.Markdown(elem_id="serve-snippets")
    gr.Markdown("#### Benchmark the endpoint")
    with gr.Row():
        rounds = gr.Number(label="Rounds", value=3, precision=0, info="x 8 fixed prompts")
        max_tokens = gr.Number(label="Max tokens", value=64, precision=0)
        bench = gr.Button("Benchmark", elem_id="serve-bench")
    bench_run = gr.State("")
    bench_status = gr.HTML()
    bench_report = gr.Markdown(elem_id="bench-report")

    choices.fill_on_focus(models, choices.onnx_models, home, limits)
    start.click(
        session.for_user(limits, functools.partial(start_serving, home, limits)),
        inputs=[models, port, key],
        outputs=[chosen],
    )
    stop.click(
        session.for_user(limits, functools.partial(stop_serving, home)),
        inputs=[chosen],
        outputs=[chosen],
    )
    chosen.change(
        session.for_viewer(limits, lambda owner, s: server_snippets(home, s, owner)),
        inputs=[chosen],
        outputs=[snippet],
    )
    bench.click(
        session.for_user(limits, functools.partial(submit_benchmark, runner)),
        inputs=[chosen, rounds, max_tokens, key],
        outputs=[bench_run, bench_status],
    )
    timer = gr.Timer(2.0)
    timer.tick(
        session.for_viewer(
            limits,
            lambda owner, s, b: (
                *serve_status(home, s, owner),
                *runs_tab.run_status(home, b, owner),
            ),
        ),
        inputs=[chosen, bench_run],
        outputs=[table, chosen, snippet, bench_status, bench_report],
    )


def start_serving(
    home: Path,
    limits: Limits | None,
    owner: str | None,
    paths: list[str] | None,
    port: float | None,
    key: str,
) -> Any:
    """Start a runtime for the chosen ONNX folders; the table shows it come up."""
    if not paths:
        raise gr.Error("Pick one or more ONNX models (quantize a model in the Quantize tab).")
    names = {}
    for path in paths:
        name = _served_name(home, path)
        while name in names:
            name += "-2"
        names[name] = path
    try:
        server_id = deploy.start_server(
            home, names, int(port or 0), key or "", owner=owner, limits=limits
        )
    except DeployError as e:
        raise gr.Error(str(e)) from e
    gr.Info(f"Starting server {server_id}; it shows 'serving' in a few seconds.")
    return gr.update(choices=choices.servers(home, owner), value=server_id)


def stop_serving(home: Path, owner: str | None, server_id: Any) -> Any:
    if not server_id:
        raise gr.Error("Pick a server to stop.")
    if not deploy.stop_server(home, int(server_id), owner):
        raise gr.Error(f"Server {server_id} is not running.")
    gr.Info(f"Server {server_id} stopped.")
    return gr.update(choices=choices.servers(home, owner), value=None)


def serve_status(home: Path, server_id: Any, owner: str | None = None) -> tuple[Any, Any, str]:
    """The servers table, the live servers to pick from (dropping a stopped choice), snippets."""
    table = servers_table(home, owner)
    live_servers = choices.servers(home, owner)
    live = server_id in [value for _, value in live_servers]
    picked = gr.update(choices=live_servers, value=server_id if live else None)
    return table, picked, server_snippets(home, server_id if live else None, owner)


def servers_table(home: Path, owner: str | None = None) -> list[list[Any]]:
    return [
        [
            r["id"],
            ", ".join(r["models"]),
            deploy.url(r),
            r["status"] + (f": {r['error'][-160:]}" if r["status"] == RunStatus.FAILED else ""),
            r["pid"],
            (r["started_at"] or "")[:19].replace("T", " "),
        ]
        for r in deploy.refresh(home, owner)
    ]


def server_snippets(home: Path, server_id: Any, owner: str | None = None) -> str:
    row = _server(home, server_id, owner)
    if row is None:
        return "Start a server (or pick one) to see how to call it."
    model = next(iter(row["models"]))
    return deploy.snippets(deploy.url(row), model, bool(row["key_required"]))


def submit_benchmark(
    runner: JobRunner, owner: str | None, server_id: Any, rounds: float, max_tokens: float, key: str
) -> tuple[str, str]:
    """Queue a benchmark run against the chosen server's first model."""
    row = _server(runner.home, server_id, owner)
    if row is None or row["status"] != "serving":
        raise gr.Error("Pick a server that is serving (start one above).")
    name, path = next(iter(row["models"].items()))
    try:
        config = BenchmarkConfig(
            url=deploy.url(row),
            model=name,
            model_dir=path,
            rounds=int(rounds or 3),
            max_tokens=int(max_tokens or 64),
        )
    except ValueError as e:
        raise gr.Error(f"Can't benchmark: {e}") from e
    secrets = {config.api_key_env: key} if key else None
    run_id = runner.submit(
        "benchmark", config, name=f"benchmark {name}", secrets=secrets, owner=owner
    )
    return run_id, runs_tab.run_status(runner.home, run_id, owner)[0]


def _server(home: Path, server_id: Any, owner: str | None = None) -> dict[str, Any] | None:
    if not server_id:
        return None
    with store.connect(home) as db:
        rows = [r for r in store.servers(db, owner=owner) if r["id"] == int(server_id)]
    return rows[0] if rows else None


def _served_name(home: Path, path: str) -> str:
    """A short model name for the API: the artifact's name, made URL-friendly."""
    lineage = deploy.lineage_of(home, path)
    raw = (lineage.get("artifact") or {}).get("name") or Path(path).name
    return "-".join(raw.lower().replace("·", " ").split())[:64] or "model"


# --- playground ------------------------------------------------------------------------------


def _playground_section(home: Path, chat: ChatClient, limits: Limits | None) -> Any:
    nobody = session.page_owner(limits)
    gr.Markdown(
        "Chat with any model made here, one or two side by side: ONNX models answer through "
        "the local runtime (started for you), transformers models and adapters through a "
        "worker process."
    )
    with gr.Row():
        model_a = gr.Dropdown(
            label="Model A",
            choices=choices.playground_models(home, nobody),
            value="bundled",
            allow_custom_value=True,
            elem_id="chat-a",
        )
        model_b = gr.Dropdown(
            label="Model B (optional)",
            choices=["", *choices.playground_models(home, nobody)],
            value="",
            allow_custom_value=True,
            elem_id="chat-b",
        )
    system = gr.Textbox(label="System prompt", lines=1, elem_id="chat-system")
    with gr.Row():
        max_new_tokens = gr.Slider(8, 1024, value=128, step=8, label="Max new tokens")
        temperature = gr.Slider(
            0, 1.5, value=0.0, step=0.05, label="Temperature", info="0 = greedy (repeatable)"
        )
        top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top p")
        key = gr.Textbox(label="Runtime API key", type="password", info="If the server has one.")
    with gr.Row():
        chat_a = gr.Chatbot(label="Model A", height=320, elem_id="chat-out-a")
        chat_b = gr.Chatbot(label="Model B", height=320, elem_id="chat-out-b")
    message = gr.Textbox(label="Message", placeholder="Type and press Enter", elem_id="chat-msg")
    clear = gr.Button("Clear", size="sm")
    for dropdown, optional in ((model_a, False), (model_b, True)):
        dropdown.focus(
            session.for_viewer(
                limits,
                lambda owner, optional=optional: gr.update(
                    choices=([""] if optional else []) + choices.playground_models(home, owner)
                ),
            ),
            outputs=[dropdown],
        )
    message.submit(
        session.for_user(limits, functools.partial(chat_turn, home, chat, limits)),
        inputs=[
            model_a,
            model_b,
            system,
            message,
            chat_a,
            chat_b,
            max_new_tokens,
            temperature,
            top_p,
            key,
        ],
        outputs=[chat_a, chat_b, message],
    )
    clear.click(lambda: ([], [], ""), outputs=[chat_a, chat_b, message])
    return model_a


def chat_turn(
    home: Path,
    chat: ChatClient,
    limits: Limits | None,
    owner: str | None,
    model_a: str,
    model_b: str,
    system: str,
    message: str,
    history_a: list | None,
    history_b: list | None,
    max_new_tokens: float,
    temperature: float,
    top_p: float = 1.0,
    key: str = "",
) -> Iterator[tuple[list, list, str]]:
    """Send one message to model A (and B), streaming each reply into its own column."""
    if not (message or "").strip():
        raise gr.Error("Type a message first.")
    if not model_a:
        raise gr.Error("Pick model A.")
    if limits is not None:  # a shared studio: the visitor's own models (and the bundled one)
        with store.connect(home) as db:
            quota.check_paths(db, home, owner, {"a": model_a, "b": model_b or ""})
    histories = [list(history_a or []), list(history_b or [])]
    for side, model in enumerate((model_a, model_b)):
        if not model:
            continue
        prior = [{"role": m["role"], "content": _text(m["content"])} for m in histories[side]]
        turns = (
            ([{"role": "system", "content": system}] if system else [])
            + prior
            + [{"role": "user", "content": message}]
        )
        histories[side] += [
            {"role": "user", "content": message},
            {"role": "assistant", "content": ""},
        ]
        try:
            reply = _reply(
                home, chat, model, turns, max_new_tokens, temperature, top_p, key, owner, limits
            )
            for piece in reply:
                histories[side][-1]["content"] += piece
                yield histories[0], histories[1], ""
        except (ChatError, DeployError) as e:
            raise gr.Error(f"Model {'AB'[side]} can't answer: {e}") from e
    yield histories[0], histories[1], ""


def _reply(
    home, chat, model, turns, max_new_tokens, temperature, top_p, key, owner=None, limits=None
) -> Iterator[str]:
    """ONNX folders answer through the runtime (started if none serves them), others via chat."""
    if not is_onnx_folder(Path(model)):
        yield from chat.stream(model, turns, int(max_new_tokens), float(temperature), float(top_p))
        return
    found = deploy.serving(home, model)
    if found is None:
        server_id = deploy.start_server(
            home, {_served_name(home, model): model}, 0, key or "", owner=owner, limits=limits
        )
        row = deploy.wait_serving(home, server_id)
        if row["status"] != "serving":
            raise DeployError(f"the runtime did not start: {row['error'] or row['status']}")
        found = row, next(iter(row["models"]))
    row, name = found
    yield from deploy.stream_chat(
        deploy.url(row),
        name,
        turns,
        int(max_new_tokens),
        float(temperature),
        float(top_p),
        key or "",
    )


def _text(content: Any) -> str:
    """Chatbot message content back to plain text (Gradio may wrap it in a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


# --- Foundry Local ---------------------------------------------------------------------------


def _foundry_section(home: Path, runner: JobRunner) -> None:
    limits, nobody = runner.limits, session.page_owner(runner.limits)
    gr.Markdown(
        "A folder and a zip that **Foundry Local** loads as it is: the ONNX Runtime GenAI "
        "files, an `inference_model.json` whose prompt template is cut from the model's own "
        "chat template (the one it was trained with), and a README with the commands."
    )
    with gr.Row():
        model = gr.Dropdown(
            label="ONNX model",
            choices=choices.onnx_models(home, nobody),
            elem_id="foundry-model",
            scale=3,
        )
        name = gr.Textbox(label="Model name", info="Empty: from the model's name.")
    build = gr.Button("Build the package", variant="primary", elem_id="foundry-build")
    run_id = gr.State("")
    status = gr.HTML()
    report = gr.Markdown(elem_id="foundry-report")
    download = gr.File(label="Package (zip)", elem_id="foundry-zip", interactive=False)
    choices.fill_on_focus(model, choices.onnx_models, home, limits)
    build.click(
        session.for_user(limits, functools.partial(submit_foundry, runner)),
        inputs=[model, name],
        outputs=[run_id, status],
    )
    timer = gr.Timer(2.0)
    timer.tick(
        session.for_viewer(limits, lambda owner, r: foundry_status(home, r, owner)),
        inputs=[run_id],
        outputs=[status, report, download],
    )


def submit_foundry(runner: JobRunner, owner: str | None, path: str, name: str) -> tuple[str, str]:
    if not path:
        raise gr.Error("Pick an ONNX model (quantize one in the Quantize tab first).")
    try:
        config = PublishConfig(
            source=path,
            destination="foundry",
            name=(name or "").strip(),
            lineage=deploy.lineage_of(runner.home, path),
        )
    except ValueError as e:
        raise gr.Error(f"Can't package: {e}") from e
    run_id = runner.submit(
        "publish", config, name=f"Foundry Local package of {Path(path).name}", owner=owner
    )
    return run_id, runs_tab.run_status(runner.home, run_id, owner)[0]


def foundry_status(home: Path, run_id: str, owner: str | None = None) -> tuple[Any, Any, Any]:
    if not run_id:
        return gr.skip(), gr.skip(), gr.skip()
    header, report = runs_tab.run_status(home, run_id, owner)
    with store.connect(home) as db:
        row = store.get_run(db, run_id, owner)
        outputs = store.artifacts(db, run_id=run_id)
    if row is None:
        return header, report, None
    summary = json.loads(row["summary_json"] or "{}")
    if row["status"] != RunStatus.SUCCEEDED or "prompt_template" not in summary:
        return header, report, None
    archive = next((Path(home) / a["path"] for a in outputs if a["kind"] == "foundry-zip"), None)
    text = (
        f"Packaged **{summary['name']}**.\n\n"
        + foundry_commands(summary["name"])
        + "\n`inference_model.json` prompt template:\n\n```json\n"
        + json.dumps(summary["prompt_template"], indent=2)
        + "\n```"
    )
    return header, text, str(archive) if archive else None


# --- Hugging Face Hub ------------------------------------------------------------------------


def _hub_section(home: Path, runner: JobRunner) -> None:
    limits, nobody = runner.limits, session.page_owner(runner.limits)
    gr.Markdown(
        "Publish a dataset, an adapter, a merged model or an ONNX model to the **Hugging Face "
        "Hub**, with a model card that tells how it was made: data and its hash, teacher, "
        "method and settings, quantization recipe, quality gate and measured speed. The card "
        "is written and checked here before anything is uploaded."
    )
    with gr.Row():
        artifact = gr.Dropdown(
            label="Artifact",
            choices=choices.publishable(home, nobody),
            elem_id="hub-artifact",
            scale=3,
        )
        repo_id = gr.Textbox(
            label="Repo id", placeholder="your-name/my-small-model", elem_id="hub-repo"
        )
    with gr.Row():
        private = gr.Checkbox(label="Private", value=True)
        license_ = gr.Textbox(label="License", value="apache-2.0")
        token = gr.Textbox(
            label="Hugging Face token",
            type="password",
            info="With write access; never stored. Empty: "
            + ("your sign-in's token." if limits else "HF_TOKEN."),
            elem_id="hub-token",
        )
    with gr.Row():
        preview = gr.Button("Preview the card", elem_id="hub-preview")
        publish = gr.Button("Publish", variant="primary", elem_id="hub-publish")
    run_id = gr.State("")
    status = gr.HTML()
    report = gr.Markdown(elem_id="hub-report")
    card = gr.Markdown(elem_id="hub-card")
    choices.fill_on_focus(artifact, choices.publishable, home, limits)
    preview.click(
        session.for_user(limits, functools.partial(preview_card, home)),
        inputs=[artifact, repo_id, license_],
        outputs=[card],
    )
    publish.click(
        session.with_request(functools.partial(submit_publish, runner)),
        inputs=[artifact, repo_id, private, license_, token],
        outputs=[run_id, status],
    )
    timer = gr.Timer(2.0)
    timer.tick(
        session.for_viewer(limits, lambda owner, r: runs_tab.run_status(home, r, owner)),
        inputs=[run_id],
        outputs=[status, report],
    )


def preview_card(home: Path, owner: str | None, path: str, repo_id: str, license_: str) -> str:
    """The card exactly as it would be uploaded, checked; or what is wrong with it."""
    if not path:
        raise gr.Error("Pick an artifact.")
    if owner is not None:
        with store.connect(home) as db:
            quota.check_paths(db, home, owner, {"source": path})
    lineage = deploy.lineage_of(home, path)
    repo = (repo_id or "").strip() or f"your-name/{Path(path).name}"
    if kind_of(Path(path)) == "dataset" and (Path(path) / "README.md").exists():
        return (Path(path) / "README.md").read_text(encoding="utf-8")
    text = model_card(lineage, repo, license_ or "apache-2.0")
    try:
        check_card(text)
    except Exception as e:  # noqa: BLE001 - StepError: shown to the user
        raise gr.Error(str(e)) from e
    return "```markdown\n" + text + "\n```"


def submit_publish(
    runner: JobRunner,
    request: gr.Request,
    path: str,
    repo_id: str,
    private: bool,
    license_: str,
    token: str,
) -> tuple[str, str]:
    """Queue a publish run; the token (typed, or on a shared studio the user's own sign-in
    token, never the host's) reaches it through the environment only."""
    owner = session.actor(runner.limits, request)
    if not path:
        raise gr.Error("Pick an artifact to publish.")
    token = (token or "").strip()
    if runner.limits is not None and not token:
        user = session.signed_in(request)
        token = (user.token if user else None) or ""
        if not token:
            raise gr.Error(
                "Type a Hugging Face token with write access: this shared studio publishes "
                "with your own token only (it is never stored)."
            )
    try:
        config = PublishConfig(
            source=path,
            destination="hub",
            repo_id=(repo_id or "").strip(),
            private=bool(private),
            license=(license_ or "apache-2.0").strip(),
            lineage=deploy.lineage_of(runner.home, path),
        )
    except ValueError as e:
        raise gr.Error(f"Can't publish: {e}") from e
    secrets = {TOKEN_ENV: token} if token else None
    try:
        run_id = runner.submit(
            "publish", config, name=f"publish {config.repo_id}", secrets=secrets, owner=owner
        )
    except (LimitReached, PermissionError) as e:
        raise gr.Error(str(e)) from e
    return run_id, runs_tab.run_status(runner.home, run_id, owner)[0]
