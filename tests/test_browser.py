"""A new user in headless Chromium: upload a file in the Data tab, find the import in the Runs tab,
test the teacher in the Distill tab, see the Quantize tab offer precisions per target, restart
the studio and find the import still there; serve, chat with and package a model in Deploy."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_app(home: Path, port: int, **env_vars: str) -> subprocess.Popen:
    env = {**os.environ, "STUDIO_HOME": str(home), "STUDIO_PORT": str(port), **env_vars}
    proc = subprocess.Popen(
        [sys.executable, "app.py"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the studio did not start within 60 s")


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


def test_upload_import_and_find_it_in_the_runs_tab_after_a_restart(tmp_path, browser):
    from playwright.sync_api import expect

    data = tmp_path / "reviews.csv"
    data.write_text(
        "text,label\n"
        + "".join(f"review number {i},{'good' if i % 3 else 'bad'}\n" for i in range(30))
    )
    home, port = tmp_path / "home", _free_port()
    app = _start_app(home, port)
    try:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        page.locator("#data-files input[type=file]").set_input_files(str(data))
        expect(page.locator("#data-detected")).to_contain_text("classification", timeout=20_000)
        expect(page.locator("#data-name textarea, #data-name input").first).to_have_value("reviews")
        page.locator("#data-import").click()
        expect(page.locator("#data-import-status")).to_contain_text("succeeded", timeout=90_000)
        expect(page.get_by_text("30 rows read")).to_be_visible()
        page.get_by_role("tab", name="Runs").click()
        expect(page.locator("#runs-table")).to_contain_text("reviews", timeout=10_000)
        expect(
            page.locator("#runs-table").get_by_text("succeeded").filter(visible=True).first
        ).to_be_visible()
        page.get_by_role("tab", name="Distill").click()
        page.locator("#distill-test").click()  # the bundled teacher is ready at once
        expect(page.locator("#distill-connection")).to_contain_text("ready", timeout=10_000)
        page.get_by_role("tab", name="Quantize").click()  # fp16 is offered for GPUs only
        fp16 = page.locator("#q-precision").get_by_text("fp16", exact=True)
        expect(fp16).to_have_count(0)
        page.locator("#q-target").get_by_text("NVIDIA GPU (CUDA)").click()
        expect(fp16).to_have_count(1, timeout=10_000)
        page.close()
    finally:
        app.terminate()
        app.wait(10)
    app = _start_app(home, port)  # restart: nothing is lost
    try:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        page.get_by_role("tab", name="Runs").click()
        cell = page.locator("#runs-table").get_by_text("reviews").filter(visible=True).first
        cell.click(timeout=10_000)  # opens the run page
        expect(page.locator("#run-header")).to_contain_text("reviews", timeout=10_000)
        expect(page.locator("#run-summary")).to_contain_text("30 rows read", timeout=10_000)
    finally:
        app.terminate()
        app.wait(10)


def test_deploy_serve_chat_and_package_in_the_browser(made_onnx, home, browser):
    """Serve a quantized model, see its endpoint, chat with it, stop it, build a Foundry
    package: the Deploy tab as a user clicks through it."""
    from playwright.sync_api import expect

    port = _free_port()
    app = _start_app(home, port)
    try:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        page.get_by_role("tab", name="Deploy").click()
        page.locator("#serve-models input").click()
        page.get_by_role("option", name="tiny int4").first.click()
        page.locator("#serve-start").click()
        expect(page.locator("#servers")).to_contain_text("serving", timeout=60_000)
        expect(page.locator("#serve-snippets")).to_contain_text("/v1", timeout=10_000)
        expect(page.locator("#serve-snippets")).to_contain_text("curl")

        page.get_by_role("tab", name="Playground").click()
        page.locator("#chat-a input").click()
        page.locator("#chat-a input").fill("")
        page.get_by_role("option", name="tiny int4").first.click()
        page.locator("#chat-msg textarea").fill("hello world")
        page.locator("#chat-msg textarea").press("Enter")
        expect(page.locator("#chat-out-a")).to_contain_text("hello world", timeout=30_000)
        expect(
            page.locator("#chat-out-a .bot, #chat-out-a [data-testid=bot]").first
        ).to_be_attached(timeout=30_000)

        page.get_by_role("tab", name="Foundry Local").click()
        page.locator("#foundry-model input").click()
        page.get_by_role("option", name="tiny int4").first.click()
        page.locator("#foundry-build").click()
        expect(page.locator("#foundry-report")).to_contain_text("foundry model run", timeout=60_000)
        expect(page.locator("#foundry-zip")).to_contain_text(".zip", timeout=10_000)

        page.get_by_role("tab", name="Serve").click()
        page.get_by_role("button", name="Stop").click()
        expect(page.locator("#servers")).to_contain_text("stopped", timeout=20_000)
        page.close()
    finally:
        app.terminate()
        app.wait(10)
        from studio import deploy

        for row in deploy.refresh(home):
            deploy.stop_server(home, row["id"])


def test_quick_start_shows_its_steps_and_a_run_is_canceled(tmp_path, browser):
    """Press Quick start, see the six steps, cancel the teacher run from the Runs tab: the chain
    stops (the next runs fail, naming the canceled one); then compare two of its runs."""
    from playwright.sync_api import expect

    from studio import quickstart, store

    home, port = tmp_path / "home", _free_port()
    app = _start_app(home, port)
    try:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        page.locator("#quickstart").click()
        status = page.locator("#quickstart-status")
        expect(status).to_contain_text("import the sample dataset", timeout=15_000)
        expect(status).to_contain_text("int4 with the quality gate")
        runs = quickstart.latest(home)
        page.get_by_role("tab", name="Runs").click()
        box = page.locator("#runs-selected textarea, #runs-selected input").first
        box.fill(runs["synthesize"])
        box.press("Enter")
        expect(page.locator("#run-header")).to_contain_text("teacher answers", timeout=10_000)
        page.get_by_role("button", name="Cancel").click()
        with store.connect(home) as db:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                statuses = {s: store.get_run(db, r)["status"] for s, r in runs.items()}
                if all(v in store.TERMINAL for v in statuses.values()):
                    break
                time.sleep(0.5)
        assert statuses["synthesize"] == "canceled"
        assert {statuses[s] for s in ("finetune", "evaluate", "lora", "quantize")} == {"failed"}
        expect(page.locator("#run-progress")).to_contain_text("canceled", timeout=10_000)
        page.get_by_role("tab", name="Compare").click()  # the two runs of the chain side by side
        for step in ("finetune", "lora"):
            page.locator("#compare-runs input").click()
            page.get_by_role("option", name=runs[step]).first.click()
        expect(page.locator("#compare-configs")).to_contain_text("≠", timeout=10_000)
        expect(page.locator("#compare-configs")).to_contain_text("base_model")
        expect(page.locator("#compare-reports")).to_contain_text("failed")
        page.close()
    finally:
        app.terminate()
        app.wait(10)


def test_a_shared_studio_keeps_each_users_runs_to_themselves(tmp_path, browser):
    """Hosted mode with password sign-in: alice imports the sample dataset; bob, signed in
    elsewhere, sees none of it, and is told the upload limit when he passes it."""
    from playwright.sync_api import expect

    home, port = tmp_path / "home", _free_port()
    app = _start_app(
        home,
        port,
        STUDIO_HOSTED="1",
        STUDIO_USERS="alice:alice-pw,bob:bob-pw",
        STUDIO_LIMIT_UPLOAD_MB="1",
    )

    def sign_in(name: str):
        page = browser.new_context().new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        page.get_by_label("username").fill(name)
        page.get_by_label("password").fill(f"{name}-pw")
        page.get_by_role("button", name="Login").click()
        expect(page.locator("#signed-in")).to_contain_text(f"Signed in as {name}", timeout=20_000)
        return page

    try:
        alice = sign_in("alice")
        expect(alice.locator("#signed-in")).to_contain_text("uploads up to 1 MB")
        alice.get_by_role("button", name="Use the sample dataset", exact=False).click()
        expect(alice.locator("#data-detected")).to_contain_text("classification", timeout=20_000)
        alice.locator("#data-import").click()
        expect(alice.locator("#data-import-status")).to_contain_text("succeeded", timeout=90_000)
        alice.get_by_role("tab", name="Runs").click()
        expect(alice.locator("#runs-table")).to_contain_text("support_intents", timeout=10_000)

        bob = sign_in("bob")
        bob.get_by_role("tab", name="Runs").click()
        time.sleep(3)  # a tick of the table has come and gone
        expect(bob.locator("#runs-table")).not_to_contain_text("support_intents")
        bob.get_by_role("tab", name="Data").click()
        big = tmp_path / "big.csv"
        big.write_text("text,label\n" + "x" * (2 * 2**20) + ",a\n")
        bob.locator("#data-files input[type=file]").set_input_files(str(big))
        expect(bob.get_by_text("exceed the maximum allowed size").first).to_be_visible(
            timeout=10_000
        )
        bob.locator("#data-chosen input").click()
        expect(bob.get_by_role("option", name="support_intents")).to_have_count(0)
    finally:
        app.terminate()
        app.wait(10)


@pytest.mark.timeout(600)
def test_finetune_quantize_and_distill_clicked_to_the_end(tmp_path, browser, bpe_lm):
    """A new user's walk through the training tabs, each run clicked to its end: import the
    sample, finetune a (tiny) model on it, quantize the result with the gate, and distil it."""
    import re

    from playwright.sync_api import expect

    home, port = tmp_path / "home", _free_port()
    app = _start_app(home, port)
    try:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        page.get_by_role("button", name="Use the sample dataset", exact=False).click()
        expect(page.locator("#data-detected")).to_contain_text("classification", timeout=20_000)
        page.locator("#data-import").click()
        expect(page.locator("#data-import-status")).to_contain_text("succeeded", timeout=90_000)

        page.get_by_role("tab", name="Finetune").click()
        page.locator("#ft-dataset input").click()
        page.get_by_role("option", name="support_intents").first.click()
        base = page.locator("#ft-base input")
        base.fill(str(bpe_lm))
        base.press("Enter")
        page.locator("#ft-steps input").fill("2")
        page.locator("#ft-start").click()
        expect(page.locator("#ft-status")).to_contain_text("succeeded", timeout=120_000)

        page.get_by_role("tab", name="Quantize").click()
        page.locator("#q-model input").click()
        page.get_by_role("option", name=re.compile("model merged")).first.click()
        page.locator("#q-start").click()
        expect(page.locator("#q-report")).to_contain_text(re.compile("PASS|FAIL"), timeout=180_000)
        expect(page.locator("#q-models")).to_contain_text("onnx")

        page.get_by_role("tab", name="Distill").click()
        page.locator("#distill-dataset input").click()
        page.get_by_role("option", name="support_intents").first.click()
        page.locator("#distill-task input").click()
        page.get_by_role("option", name="Conversation (free answers)").click()
        teacher = page.locator("#distill-teacher input")
        teacher.fill(str(bpe_lm))
        teacher.press("Enter")
        page.locator("#distill-keep input").fill("1")
        page.locator("#distill-steps input").fill("2")
        page.locator("#distill-rows input").fill("4")
        page.get_by_text("Teacher settings").click()
        page.locator("#distill-teacher-rows input").fill("8")
        page.locator("#distill-start").click()
        status = page.locator("#distill-status")
        expect(status).to_contain_text(re.compile(r"evaluate.*succeeded"), timeout=180_000)
        expect(status).not_to_contain_text("failed")
        page.close()
    finally:
        app.terminate()
        app.wait(10)
