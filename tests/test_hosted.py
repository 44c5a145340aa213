"""Hosted mode (a shared studio): each user sees, cancels and deletes only their own runs,
artifacts and servers; limits stop with a message that says what to change; the host's secrets
never reach what the studio starts; publishing uses the user's own token."""

import functools
import json
import shutil
import time
from types import SimpleNamespace

import gradio as gr
import pytest

from pipelines.lib.models import models_dir
from studio import deploy, quickstart, quota, store
from studio.jobs import JobRunner
from studio.quota import LimitReached
from studio.settings import Limits, Settings, child_environ, parse_users
from studio.ui import app, choices, deploy_tab, finetune_tab, runs_tab, session
from tests.test_deploy import TOKEN, _assert_secret_nowhere, hub  # noqa: F401 - a fixture
from tests.test_ui import _import

LIMITS = Limits(upload_mb=1, rows=5, train_steps=50, queued_runs=3, servers=1)


@pytest.fixture
def hosted(monkeypatch):
    monkeypatch.setenv("STUDIO_HOSTED", "1")
    return LIMITS


def _as(name: str) -> gr.Request:
    return gr.Request(username=name)


def _oauth(name: str, token: str, expires_in: float = 3600) -> gr.Request:
    """A request as Gradio builds it for a visitor signed in with Hugging Face."""
    info = {
        "access_token": token,
        "expires_at": time.time() + expires_in,
        "userinfo": {"preferred_username": name},
    }
    return gr.Request(request=SimpleNamespace(scope={"session": {"oauth_info": info}}))


def test_who_is_signed_in():
    assert session.signed_in(_as("alice")).name == "alice"
    user = session.signed_in(_oauth("bob", "hf_bob"))
    assert (user.name, user.token) == ("bob", "hf_bob")
    assert session.signed_in(_oauth("bob", "hf_bob", expires_in=-1)) is None
    assert session.signed_in(gr.Request()) is None
    assert session.viewer(None, None) is None  # a single-user studio shows everything
    assert session.viewer(LIMITS, gr.Request()) == session.NOBODY  # nothing before sign-in
    act = session.for_user(LIMITS, lambda owner: owner)
    with pytest.raises(gr.Error, match="Sign in first"):
        act(gr.Request())
    assert act(_as("alice")) == "alice"


def test_each_user_sees_and_touches_only_their_own_runs(home, fake_steps, hosted):
    runner = JobRunner(home, inline=True, limits=hosted)
    run_id = runner.submit("fake", fake_steps.FakeConfig(steps=2), owner="alice")
    with store.connect(home) as db:
        made = home / store.artifacts(db, run_id=run_id)[0]["path"]
        assert [a["run_id"] for a in store.artifacts(db, owner="alice")] == [run_id]
        assert store.artifacts(db, owner="bob") == []
    assert [r[0] for r in runs_tab.runs_table(home, owner="alice")] == [run_id]
    assert runs_tab.runs_table(home, owner="bob") == []
    assert runs_tab.refresh_run(home, run_id, owner="bob")[0] == f"No run `{run_id}`."
    assert runs_tab.run_status(home, run_id, "bob") == ("", "")
    assert runner.cancel(run_id, "bob") == "unknown"
    with pytest.raises(gr.Error, match="not yours"):
        runs_tab.delete_run(runner, run_id, "bob")
    with pytest.raises(ValueError, match="no run"):
        runner.rerun(run_id, "bob")
    assert made.exists()
    # bob may not read alice's files, nor the machine's; a Hub id is no local path
    sneaky = (
        "/" * 4100 + str(made),  # pathlib collapses the slashes back to alice's file
        str(home / "uploads" / ".." / "runs" / run_id),
    )
    for path in (str(made), str(home / "runs" / run_id), "/etc/hostname", *sneaky):
        with pytest.raises(PermissionError, match="not yours to use"):
            runner.submit("fake", fake_steps.FakeConfig(input_path=path), owner="bob")
    runner.submit("fake", fake_steps.FakeConfig(input_path="HuggingFaceTB/x"), owner="bob")
    again = runner.submit("fake", fake_steps.FakeConfig(input_path=str(made)), owner="alice")
    assert len(runs_tab.runs_table(home, owner="alice")) == 2
    assert runs_tab.compare(home, [run_id, again], None, "bob")[0] is None
    assert runs_tab.compare(home, [run_id, again], None, "alice")[0] is not None
    assert runs_tab.delete_run(runner, again, "alice") == ""
    assert runs_tab.delete_run(runner, run_id, "alice") == "" and not made.exists()


def test_limits_say_what_to_change(home, fake_steps, hosted):
    runner = JobRunner(home, limits=hosted)  # not started: runs stay queued
    for _ in range(3):
        runner.submit("fake", fake_steps.FakeConfig(), owner="alice")
    with pytest.raises(LimitReached, match="You have 3 runs queued or running.*cancel one"):
        runner.submit("fake", fake_steps.FakeConfig(), owner="alice")
    runner.submit("fake", fake_steps.FakeConfig(), owner="bob")  # limits are per user
    with pytest.raises(LimitReached, match="this needs 6"):  # a chain is queued whole or not
        quickstart.submit(runner, owner="bob")
    with store.connect(home) as db:
        assert store.active_runs(db, "bob") == 1
        runner.cancel(store.list_runs(db, owner="alice")[0]["id"], "alice")
        assert store.active_runs(db, "alice") == 2

    start = session.for_user(hosted, functools.partial(finetune_tab.submit_finetune, runner))
    with pytest.raises(gr.Error, match="at most 50 steps.*whole epochs"):
        start(_as("carol"), dataset_dir="some-data", max_steps=0)
    with pytest.raises(gr.Error, match=r"set Max steps to 50 or less \(it is 500\)"):
        start(_as("carol"), dataset_dir="some-data", max_steps=500)


def test_rows_and_upload_size_limits(home, tmp_path, tiny_tokenizer_dir, hosted):
    runner = JobRunner(home, inline=True, limits=hosted)
    settings = Settings(home=home, max_upload_mb=200, limits=hosted)
    tokenizer = models_dir() / "tiny-tokenizer"  # shared by all users, as the bundled model
    shutil.copytree(tiny_tokenizer_dir, tokenizer, dirs_exist_ok=True)
    data = tmp_path / "twelve.csv"
    data.write_text("text,label\n" + "".join(f"row {i},{'ab'[i % 2]}\n" for i in range(12)))
    run_id, _ = _import(runner, settings, [str(data)], tokenizer, owner="alice")
    with store.connect(home) as db:
        row = store.get_run(db, run_id, "alice")
    stats = json.loads(row["summary_json"])
    assert row["status"] == "succeeded" and stats["rows_read"] == 5
    assert "Only the first **5** rows were read" in runs_tab.run_status(home, run_id, "alice")[1]
    # the upload is kept in alice's own folder
    files = json.loads(row["config_json"])["files"]
    assert all(str(store.uploads_dir(home, "alice")) in f for f in files)
    big = tmp_path / "big.csv"
    big.write_text("text,label\n" + "x" * (2 * 2**20) + ",a\n")
    with pytest.raises(gr.Error, match="hold 2.0 MB.*at most 1 MB per import"):
        _import(runner, settings, [str(big)], tokenizer, owner="alice")


def test_servers_are_per_user_and_limited(made_onnx, home, hosted):
    _, folder = made_onnx
    with store.connect(home) as db:
        db.execute("update runs set owner = 'alice'")
    models = {"tiny": str(folder)}
    with pytest.raises(deploy.DeployError, match="not yours to use"):
        deploy.start_server(home, models, owner="bob", limits=hosted)
    server_id = deploy.start_server(home, models, owner="alice", limits=hosted)
    try:
        with pytest.raises(deploy.DeployError, match="allows 1 per user: stop one"):
            deploy.start_server(home, models, owner="alice", limits=hosted)
        assert deploy.refresh(home, "bob") == []
        assert choices.servers(home, "bob") == []
        assert not deploy.stop_server(home, server_id, "bob")
        assert [r["id"] for r in deploy.refresh(home, "alice")] == [server_id]
    finally:
        assert deploy.stop_server(home, server_id, "alice")


def test_the_hosts_secrets_stay_out_of_what_the_studio_starts(home, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_host")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-host")
    monkeypatch.setenv("STUDIO_USERS", "alice:pw")
    assert child_environ()["HF_TOKEN"] == "hf_host"  # a single-user studio: the user's own
    monkeypatch.setenv("STUDIO_HOSTED", "1")
    env = child_environ(STUDIO_HF_TOKEN="hf_user")
    assert {"HF_TOKEN", "OPENAI_API_KEY", "STUDIO_USERS"}.isdisjoint(env)
    assert env["STUDIO_HF_TOKEN"] == "hf_user" and "STUDIO_HOME" in env


def test_publishing_uses_the_users_own_token(made_onnx, home, hub, hosted, monkeypatch):  # noqa: F811
    _, folder = made_onnx
    with store.connect(home) as db:
        db.execute("update runs set owner = 'alice'")
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the host's token: never the visitors'
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the worker talks to the Hub test double
    runner = JobRunner(home, limits=hosted, poll_s=0.05)
    assert runner.start()
    try:
        publish = session.with_request(functools.partial(deploy_tab.submit_publish, runner))
        form = [str(folder), "alice/tiny", True, "mit"]
        with pytest.raises(gr.Error, match="your own token only"):
            publish(_as("alice"), *form, "")
        with pytest.raises(gr.Error, match="Sign in first"):
            publish(gr.Request(), *form, "")
        refused, _ = publish(_oauth("alice", "hf_not_valid"), *form, "")
        assert runner.wait(refused, 60)["status"] == "failed"  # not rescued by HF_TOKEN
        run_id, _ = publish(_oauth("alice", TOKEN), *form, "")
        row = runner.wait(run_id, 60)
        assert row["status"] == "succeeded", row["error"] or row["traceback"]
        assert row["owner"] == "alice" and set(hub.repos) == {"alice/tiny"}
    finally:
        runner.stop()
    monkeypatch.delenv("HF_TOKEN")
    _assert_secret_nowhere(home, TOKEN)
    _assert_secret_nowhere(home, "hf_not_valid")


def test_a_hosted_studio_needs_a_way_to_sign_in(home, monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    with pytest.raises(SystemExit, match="STUDIO_USERS=name:password"):
        app.launch(Settings(home=home, limits=LIMITS))
    for text in ("alice", "alice:", ":pw"):
        with pytest.raises(ValueError, match="name:password"):
            parse_users(text)
    assert parse_users(" alice:p:w , bob:x") == {"alice": "p:w", "bob": "x"}
    assert choices.datasets(home, session.NOBODY) == []


def test_urls_lead_to_the_internet_or_to_the_owners_own_server(home):
    """A teacher endpoint or a benchmark URL on a shared studio: never loopback, private,
    link-local (cloud metadata) or unspecified addresses, unless it is a model the user serves."""
    with store.connect(home) as db:
        for url in (
            "http://127.0.0.1:8000/v1",
            "http://localhost:7860/",
            "http://169.254.169.254/latest/meta-data",
            "http://10.0.0.5/v1",
            "http://[::1]:8000/v1",
            "http://0.0.0.0:8000/v1",
            "file:///etc/passwd",
        ):
            with pytest.raises(PermissionError):
                quota.check_url(db, "bob", url)
        quota.check_url(db, "bob", "https://93.184.215.14/v1")  # a public address
        store.add_server(db, {"m": "/x"}, "127.0.0.1", 8123, False, "/x.log", owner="bob", pid=1)
        quota.check_url(db, "bob", "http://127.0.0.1:8123/v1")  # bob's own runtime
        with pytest.raises(PermissionError, match="leads into this machine"):
            quota.check_url(db, "alice", "http://127.0.0.1:8123/v1")  # not alice's
