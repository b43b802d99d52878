"""The whole thing from outside: the dashboard in a real browser (Playwright driving
chromium) over a real server and real worker processes, and ``spotrun up`` as a user
starts it."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Env, wait_until
from spotrun.chaos.processes import free_port
from spotrun.config import Settings
from spotrun.http.app import create_app
from spotrun.serve import ServerThread
from spotrun.store import JobStore

CHROMIUM = os.environ.get("SPOTRUN_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic"]


def _need_chromium() -> None:
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        msg = f"chromium not found at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture
def browser() -> Iterator[Any]:
    _need_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def dashboard(env_factory: Callable[..., Env], sqlite_url: str
              ) -> Iterator[tuple[str, str, Env]]:
    """The server on a free port with two real workers (torch preloaded): (url, token, env)."""
    # The periodic checkpoint's interval is chosen (and explained in the history) after a
    # second of running, well before the test preempts the job.
    env = env_factory(sqlite_url, SPOTRUN_CHECKPOINT_MIN_SECONDS="1")
    for name in ("w1", "w2"):
        env.worker(name, preload=True)
    store = JobStore.open(sqlite_url)
    token = store.create_token("admin", admin=True)
    settings = Settings.from_env(home=str(env.home), database_url=sqlite_url)
    srv = ServerThread(create_app(settings, store=store), "127.0.0.1", 0, access_log=False)
    srv.start()
    try:
        yield f"http://127.0.0.1:{srv.port}", token, env
    finally:
        srv.stop()
        store.close()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _no_horizontal_overflow(page: Any) -> bool:
    return bool(page.evaluate(
        "document.documentElement.scrollWidth <= document.documentElement.clientWidth"))


@pytest.mark.slow
def test_train_preempt_and_resume_in_the_browser(
        browser: Any, dashboard: tuple[str, str, Env]) -> None:
    from playwright.sync_api import expect

    url, token, env = dashboard
    context = browser.new_context()
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)

    # The URL `spotrun up` prints fills the token in (it travels in the fragment) and
    # waits for a click: a link alone signs nobody in.
    page.goto(f"{url}/login#token={token}")
    expect(page.locator("#from-link")).to_be_visible()
    assert "token" not in page.url and page.input_value("#token") == token
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
    assert all(c["value"] != token for c in context.cookies())  # a session, not the token

    page.get_by_role("link", name="New job").first.click()
    page.get_by_role("link", name="digits-train").click()
    page.fill("#f-epochs", "3")
    page.fill("#f-step_delay", "0.05")
    page.select_option("#f-device", "cpu")
    page.get_by_role("button", name="Start job").click()
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f]+$"))
    job_id = page.url.rsplit("/", 1)[1]

    # The bar moves, live.
    bar = page.locator("#job-progress")

    def value() -> float:
        return float(bar.evaluate("e => e.max > 1 ? e.value : 0"))

    first = wait_until(value, 60, "the progress bar to start", interval=0.1)
    wait_until(lambda: value() > first, 30, "the progress bar to move", interval=0.1)
    # The training curve draws itself while the job runs: a line per metric, growing.
    loss = page.locator('#curve polyline[data-metric="loss"]')
    expect(loss).to_have_count(1, timeout=30_000)

    def loss_points() -> int:
        return len((loss.get_attribute("points") or "").split())

    drawn = loss_points()
    wait_until(lambda: loss_points() > drawn, 30, "the curve to grow", interval=0.1)
    expect(page.locator("#curve-legend")).to_contain_text("loss")
    worker_text = page.locator("#job-worker")
    expect(worker_text).to_have_text(re.compile(r"Running on worker w[12]\."))
    running_on = re.search(r"w[12]", worker_text.inner_text())
    assert running_on is not None
    victim = running_on.group(0)
    other = "w2" if victim == "w1" else "w1"

    # The job list's bar moves too.
    workers = context.new_page()
    workers.goto(f"{url}/")
    row_bar = workers.locator(f'li.job[data-job-id="{job_id}"] progress')
    seen = float(row_bar.evaluate("e => e.value"))
    wait_until(lambda: float(row_bar.evaluate("e => e.value")) > seen, 30,
               "the job list's bar to move", interval=0.1)

    expect(page.locator("#timeline")).to_contain_text("chosen from how often this pool",
                                                      timeout=30_000)
    # An admin presses "Simulate preemption" for the worker running it.
    workers.goto(f"{url}/workers")
    card = workers.locator(f'li.worker[data-worker="{victim}"]')
    card.get_by_role("button", name="Simulate preemption").click()
    expect(workers.locator("#notice")).to_contain_text(
        f"Sent a preemption notice to worker {victim}")

    # The timeline tells the story, live, and the job ends well.
    timeline = page.locator("#timeline")
    expect(timeline).to_contain_text(f"preempted on {victim}", timeout=30_000)
    expect(timeline).to_contain_text(f"resumed on {other} from step", timeout=60_000)
    # ...and the curve marks where the job was taken away and where it went on.
    expect(page.locator("#curve .marker-preempted")).to_have_count(1, timeout=30_000)
    expect(page.locator("#curve .marker-resumed")).to_have_count(1, timeout=30_000)
    expect(page.locator("#curve .marker-preempted title")).to_contain_text(
        f"preempted on {victim}")
    expect(page.locator("#job-state")).to_have_text("Succeeded", timeout=90_000)
    expect(page.locator("#job-result")).to_contain_text("accuracy")
    # The finished job: where it ran, and what it cost against on-demand machines.
    expect(page.locator("#job-worker")).to_have_text(f"Ran on worker {other}.")
    saving = page.locator("#job-cost-saving")
    expect(saving).to_have_text(re.compile(r"\$0\.\d{4,6} \(\d+ %\)"))
    assert float(saving.inner_text().split()[0][1:]) > 0
    expect(page.locator("#job-cost-on-demand")).to_have_text("0.0 s")
    spot_paid = page.locator("#job-cost-spot").inner_text()
    assert spot_paid.endswith(" s") and float(spot_paid[:-2]) > 0, spot_paid
    redone = page.locator("#job-cost-redone").inner_text()
    assert redone.endswith(" s") and float(redone[:-2]) < float(spot_paid[:-2]), redone
    # History speaks plainly; how the checkpoint period was chosen opens under its line.
    note = page.locator("#timeline details", has_text="chosen from how often this pool")
    expect(note).to_have_count(1)
    expect(note.locator(".detail")).to_be_hidden()
    note.locator("summary").click()
    expect(note.locator(".detail")).to_be_visible()
    expect(note.locator(".detail")).to_contain_text("Young/Daly optimum sqrt(2 x C x M)")
    # The finished page draws the same curve from the stored series.
    expect(page.locator("#curve .marker-preempted")).to_have_count(1)
    series = env.store().metric_series(job_id)
    assert {p.attempt for p in series} == {1, 2} and len(series) >= 3
    assert [p.step for p in series] == sorted(p.step for p in series)
    kinds = [e.kind for e in env.store().get(job_id).events]
    assert kinds.index("preempted") < kinds.index("resumed") < kinds.index("succeeded")

    # The operator's cost panel: the job ran on spot workers (default prices), so it
    # cost less than the same work on on-demand machines.
    workers.goto(f"{url}/workers")
    expect(workers.locator("#cost-preemptions")).to_have_text("1")
    saved = workers.locator("#cost-saved").inner_text()
    assert re.fullmatch(r"\$0\.\d{4} \(\d+ %\)", saved), saved
    assert float(saved[1:7]) > 0

    # Readable on a phone: no page scrolls sideways at 390x844.
    phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True,
                                has_touch=True, device_scale_factor=2)
    small = phone.new_page()
    small.goto(f"{url}/login#token={token}")
    small.get_by_role("button", name="Sign in").click()
    expect(small.get_by_role("heading", name="Jobs")).to_be_visible()
    for path in ("/", f"/jobs/{job_id}", "/submit?pipeline=digits-infer", "/workers?all=1"):
        small.goto(url + path)
        assert _no_horizontal_overflow(small), path
    phone.close()
    context.close()
    assert problems == []


def test_login_refuses_a_bad_token_and_pages_need_a_login(
        browser: Any, sqlite_url: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    store = JobStore.open(sqlite_url)
    user = store.create_token("alice")
    settings = Settings.from_env(home=str(tmp_path), database_url=sqlite_url)
    srv = ServerThread(create_app(settings, store=store), "127.0.0.1", 0, access_log=False)
    srv.start()
    url = f"http://127.0.0.1:{srv.port}"
    try:
        page = browser.new_page()
        page.goto(f"{url}/workers")
        assert page.url.endswith("/login")
        page.fill("#token", "spr_wrong")
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator(".error")).to_contain_text("not valid")
        page.fill("#token", user)
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
        cookie = next(c for c in page.context.cookies() if c["name"] == "spotrun_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert cookie["value"] != user
        # The workers (hosts, pids, pools) are for operators only.
        assert page.get_by_role("link", name="Workers").count() == 0
        page.goto(f"{url}/workers")
        expect(page.locator("main")).to_contain_text("Only an administrator")
        # A bad param is explained on the form, not as an error page.
        page.goto(f"{url}/submit?pipeline=digits-infer")
        page.fill("#f-model", "0123abc")
        page.get_by_role("button", name="Start job").click()
        expect(page.locator("#form-error")).to_contain_text("'model': is not a job id")
        assert page.input_value("#f-model") == "0123abc"  # what was typed is kept
        assert store.list_jobs() == []
        # No worker runs here: a queued job is cancelled at once.
        page.goto(f"{url}/submit?pipeline=sleep")
        page.get_by_role("button", name="Start job").click()
        expect(page.locator("#job-state")).to_have_text("Waiting for a worker")
        page.get_by_role("button", name="Cancel this job").click()
        expect(page.locator("#job-state")).to_have_text("Cancelled")
        (job,) = store.list_jobs()
        assert (job.owner, job.state.value) == ("alice", "cancelled")
        page.get_by_role("button", name="Sign out").click()
        page.goto(f"{url}/")
        assert page.url.endswith("/login")
    finally:
        srv.stop()
        store.close()


# -------------------------------------------------------------------- spotrun up


def test_up_runs_everything_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SPOTRUN_DATABASE_URL", "SPOTRUN_CHECKPOINT_URL")}
    env.update(SPOTRUN_HOME=str(tmp_path / "home"), SPOTRUN_PREEMPTION_SOURCES="signal",
               PYTHONUNBUFFERED="1")
    port = free_port()
    log = open(tmp_path / "up.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "spotrun", "up", "--workers", "1",
                             "--port", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=log, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in proc.stdout or ():
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        token = ""
        give_up = time.monotonic() + 60
        while not token:
            line = lines.get(timeout=max(0.1, give_up - time.monotonic()))
            if "admin token" in line:
                token = line.split()[-1]
            elif "/login#token=" in line:
                assert f"http://127.0.0.1:{port}/login#token=" in line
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=10,
                          headers={"Authorization": f"Bearer {token}"}) as client:
            wait_until(lambda: client.get("/healthz").status_code == 200, 30, "/healthz")
            short = client.post("/v1/jobs", json={"pipeline": "sleep",
                                                  "params": {"seconds": 0.5}})
            assert short.status_code == 201, short.text
            wait_until(lambda: client.get(f"/v1/jobs/{short.json()['id']}").json()["state"]
                       == "succeeded", 60, "the sleep job to succeed",
                       on_fail=lambda: (tmp_path / "up.log").read_text())
            # A long job is running when Ctrl-C comes: the worker hands it back.
            long = client.post("/v1/jobs", json={"pipeline": "sleep",
                                                 "params": {"seconds": 60, "steps": 600}})
            long_id = long.json()["id"]
            wait_until(lambda: client.get(f"/v1/jobs/{long_id}").json()["progress"]["step"]
                       > 0, 30, "the long job to run")
            (worker,) = client.get("/v1/workers").json()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, (tmp_path / "up.log").read_text()
        assert not pid_alive(worker["pid"])
        store = JobStore.open(f"sqlite:///{tmp_path / 'home' / 'spotrun.db'}")
        try:
            long_job = store.get(long_id)
            assert long_job.state.value == "queued"
            assert long_job.events[-1].kind == "handed_back"
            assert [w.state for w in store.list_workers()] == ["stopped"]
            assert store.verify_token(token) is None  # the session's token died with it
        finally:
            store.close()
        rest = []
        with contextlib.suppress(queue.Empty):
            while True:
                rest.append(lines.get(timeout=1))
        assert any("stopped" in line for line in rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()


@pytest.fixture
def api_only(sqlite_url: str, tmp_path: Path) -> Iterator[str]:
    """The server alone, on a free port: its URL."""
    store = JobStore.open(sqlite_url)
    settings = Settings.from_env(home=str(tmp_path), database_url=sqlite_url)
    srv = ServerThread(create_app(settings, store=store, deliverer=False), "127.0.0.1", 0,
                       access_log=False)
    srv.start()
    try:
        yield f"http://127.0.0.1:{srv.port}"
    finally:
        srv.stop()
        store.close()


def test_the_api_docs_work_offline(browser: Any, api_only: str) -> None:
    from playwright.sync_api import expect

    context = browser.new_context()
    elsewhere: list[str] = []

    def only_this_server(route: Any) -> None:
        if route.request.url.startswith(api_only + "/"):
            route.continue_()
        else:  # a CDN, or anything else off this machine
            elsewhere.append(route.request.url)
            route.abort()

    context.route("**/*", only_this_server)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.goto(f"{api_only}/docs")
    expect(page.locator(".swagger-ui .title").first).to_contain_text("spotrun")
    expect(page.locator(".opblock-summary-path", has_text="/v1/jobs/{job_id}").first
           ).to_be_visible()
    assert elsewhere == [] and problems == [], (elsewhere, problems)
    assert httpx.get(f"{api_only}/docs/assets/swagger-ui-bundle.js").status_code == 200
    context.close()
