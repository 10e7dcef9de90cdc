"""The playground page in a real headless browser (Chromium, driven by Playwright): it loads without a console
error, streams text, stops, shows the server's error messages, shows a sentence-step run's plan, compares two
models, waits for a run that is loading, and never runs model output as HTML.

Needs Chromium (Debian's ``chromium`` package; ``.ci/run`` installs it) and the ``playwright`` Python package
(the dev extra); skipped without them.
"""

from __future__ import annotations

import shutil
import time

import pytest

import sentcode

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no Chromium on this machine (Debian: apt-get install chromium)", allow_module_level=True)

from sentcode.serve.config import ServeConfig  # noqa: E402
from sentcode.serve.server import BackgroundServer  # noqa: E402
from test_playground import planning_generator  # noqa: E402
from test_serve import call  # noqa: E402

# Offline and sandbox-safe: no background traffic to the network, no GPU.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
EVIL = ['<img src=x onerror="document.title=\'pwned\'">', "<script>document.title='pwned'</script>", " & done."]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def multi(trained_run):
    runs = {"flat": sentcode.load(trained_run[0]), "planner": planning_generator()}
    with BackgroundServer(runs, ServeConfig(port=0, max_tokens=20_000)) as server:
        yield server


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1200, "height": 900})
    pg = ctx.new_page()
    pg.errors = []
    pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    yield pg
    ctx.close()


def open_page(page, server):
    page.goto(server.url + "/")
    page.wait_for_selector("#model option", state="attached")
    page.wait_for_selector(".card .fact")


def generate(page, **fields):
    for k, v in fields.items():
        page.fill(f"#{k}", str(v))
    page.click("#go")  # the click handler disables the button before it awaits anything
    page.wait_for_selector("#go:enabled", timeout=60_000)


def test_the_page_loads_and_streams_what_the_api_writes(page, multi):
    open_page(page, multi)
    assert page.eval_on_selector_all("#model option", "els => els.map(e => e.value)") == ["flat", "planner"]
    assert "flat LM" in page.text_content("#card") and "parameters" in page.text_content("#card")
    generate(page, prompt="We must", temperature=0, length=40)
    status, r, _ = call(multi, "/v1/completions", {"model": "flat", "prompt": "We must", "max_tokens": 40,
                                                   "temperature": 0, "top_p": 1})
    assert status == 200 and page.text_content("#output") == r["choices"][0]["text"] != ""
    assert "bytes/s" in page.text_content("#meta")
    assert page.errors == []


def test_stop_stops_the_stream_and_frees_the_server(page, multi):
    open_page(page, multi)
    page.fill("#length", "20000")
    page.click("#go")
    deadline = time.monotonic() + 30
    while not page.text_content("#output") and time.monotonic() < deadline:
        time.sleep(0.05)
    page.click("#stop")
    page.wait_for_selector("#go:enabled")
    shown = page.text_content("#output")
    time.sleep(0.5)
    assert shown and page.text_content("#output") == shown and len(shown.encode()) < 20_000
    deadline = time.monotonic() + 10
    while call(multi, "/health")[1]["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert call(multi, "/health")[1]["in_flight"] == 0  # the server noticed and let the request go


def test_a_bad_value_shows_the_servers_message(page, multi):
    open_page(page, multi)
    generate(page, temperature=5)
    assert page.is_visible("#error") and "temperature" in page.text_content("#error")
    page.select_option("#model", "planner")
    generate(page, temperature=0.8, length=500)
    assert "at most" in page.text_content("#error") and "sentences" in page.text_content("#error")


def test_the_plan_view_shows_planned_and_written_codes(page, multi):
    open_page(page, multi)
    page.select_option("#model", "planner")
    assert page.is_visible("#show-plan")
    generate(page, seed=3, length=2)
    rows = page.locator("#segments > li")
    assert 1 <= rows.count() <= 2
    first = rows.nth(0).text_content()
    assert "planned [" in first and "written [" in first and "agreement" in first
    assert "candidates, kept #" in first  # the run reranks 4 candidates by default
    assert page.text_content("#output") == "".join(rows.nth(i).locator(":scope > .segtext").text_content()
                                                   for i in range(rows.count()))


def test_the_compare_view_streams_two_models(page, multi):
    open_page(page, multi)
    page.click("#tab-compare")
    page.select_option("#model", "flat")
    page.select_option("#model2", "planner")
    assert "(sentences)" in page.text_content("#length2-label")
    generate(page, temperature=0, length=30, length2=1)
    assert page.text_content("#output-a") and page.text_content("#output-b")
    assert "flat LM" in page.text_content("#card-a") and "sentence-step" in page.text_content("#card-b")
    assert page.errors == []


def test_model_output_that_is_html_is_shown_as_text(page):
    gen = planning_generator()
    gen.stream = lambda prompt, **kw: iter(EVIL)
    gen.stream_plan = lambda prompt, **kw: iter({"text": t, "planned": [1, 2], "written": [1, 2], "agreement": 1.0,
                                                 "candidates": [], "chosen": 0} for t in EVIL)
    with BackgroundServer({"evil": gen}, ServeConfig(port=0)) as server:
        open_page(page, server)
        for plan in (True, False):
            page.set_checked("#show-plan", plan)
            generate(page)
            text = page.text_content("#output")
            assert "<img src=x onerror=" in text and "<script>" in text
            assert page.locator("#output img, #output script, #segments img, #segments script").count() == 0
            assert page.title() == "sentcode playground"


def test_a_loading_model_shows_a_loading_state(page, trained_run):
    with BackgroundServer({"late": sentcode.load(trained_run[0])}, ServeConfig(port=0)) as server:
        st = server.served.states["late"]
        gen, st.gen = st.gen, None  # as the server looks while the run loads
        page.goto(server.url + "/")
        page.wait_for_selector("#status:has-text('Loading late')")
        assert "loading" in page.text_content("#card")
        st.gen = gen
        page.wait_for_selector("#status", state="hidden", timeout=10_000)
        page.wait_for_selector(".card .fact")
        assert page.errors == []
