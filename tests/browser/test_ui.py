"""The Prefect UI as a person drives it: `serve` on a temporary root, a stage deployment's Custom
run form filled field by field (the tiny test model and corpus), Submit, the run completes on
the worker, its Artifacts tab links the HTML report, and the report opens with every plot
loaded and the run's numbers in it; the index of reports links it.

Debian's Chromium driven by Playwright (Playwright's own browser download needs the network).
Skipped only where /usr/bin/chromium is absent and cannot be installed (`make browser`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from flows import serve
from stores.artifacts import ArtifactStore

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # no calls to hosts a closed network refuses
DEPLOYMENT = "train_heads"
RUN_TIMEOUT_S = 300
REPORT_LINK = re.compile(r"\]\((https?://[^)\s]+/report\.html)\)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def chromium() -> Path:
    """Debian's chromium, installed with apt-get where it is missing and we may (root)."""
    if not CHROMIUM.exists() and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run("apt-get update -q && apt-get install -y -q chromium", shell=True, check=False,
                       capture_output=True, timeout=900)
    if not CHROMIUM.exists():
        pytest.skip(f"no browser: {CHROMIUM} is absent and could not be installed; "
                    "install it with `make browser` (apt-get install -y chromium, as root)")
    return CHROMIUM


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory, make_tiny_family, corpus_dir) -> tuple[Path, Path]:
    """A 5-layer tiny Llama (exit layers 1..4 fit the form's four default layer fields) and a
    folder of text documents."""
    return make_tiny_family(tmp_path_factory.mktemp("tiny-llama-5"), "llama", num_layers=5), corpus_dir


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-root")
    try:
        yield root, serve.start(root, port=_free_port(), report_port=_free_port(), timeout=180)
    finally:
        serve.stop(root, quiet=True)


@pytest.fixture
def browser(chromium):
    """A Chromium context, closed (with the browser) whatever the test does."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            ctx = b.new_context(viewport={"width": 1400, "height": 1000})
            ctx.set_default_timeout(20_000)
            yield ctx
        finally:
            b.close()


@contextlib.contextmanager
def _screenshots_on_failure(ctx, folder: Path):
    """On failure, leave a screenshot of every open page in `folder` and say where."""
    try:
        yield
    except BaseException as e:
        shots = []
        for i, page in enumerate(ctx.pages):
            with contextlib.suppress(Exception):
                page.screenshot(path=str(folder / f"page{i}.png"))
                shots.append(str(folder / f"page{i}.png"))
        print(f"{type(e).__name__}; screenshots: {', '.join(shots) or 'none'}")  # shown with the failure
        raise


# -- the run form ------------------------------------------------------------------------------
def _field(scope, label: str):
    """A property of Prefect's schema form by its label ("model", "Seq Len"), inside `scope`;
    labels of optional fields end in " (Optional)"."""
    return scope.locator(
        "xpath=.//div[contains(concat(' ', normalize-space(@class), ' '), ' schema-form-property ')]"
        "[./div[contains(@class, 'p-label__header')]//span[contains(@class, 'schema-form-property__label')]"
        f"[normalize-space()='{label}' or starts-with(normalize-space(), '{label} (')]]").first


def _fill(section, label: str, value: str, *, kind: str | None = None) -> None:
    """Type into a field; ``kind`` first picks the type of an optional field (``int``, ``str``)."""
    field = _field(section, label)
    if kind:
        field.get_by_role("button", name=kind, exact=True).click()
    field.locator("textarea, input").first.fill(value)


def _open_custom_run(page, ui_url: str, deployment: str) -> None:
    page.goto(f"{ui_url}/deployments", wait_until="networkidle")
    page.get_by_role("link", name=deployment, exact=True).first.click()
    page.wait_for_url("**/deployments/deployment/**")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run", exact=True).click()
    page.wait_for_url("**/run**")
    page.wait_for_selector(".schema-form-property")


# -- the API -----------------------------------------------------------------------------------
def _wait_for_run(api, deployment_id: str, worker_log: str) -> dict:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        runs = api.post("/flow_runs/filter", json={
            "flow_runs": {"deployment_id": {"any_": [deployment_id]}}}).raise_for_status().json()
        if runs and runs[0]["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            assert len(runs) == 1, [r["name"] for r in runs]
            return runs[0]
        time.sleep(1)
    raise AssertionError(f"no finished run of {DEPLOYMENT} after {RUN_TIMEOUT_S} s; worker log ends:\n"
                         f"{Path(worker_log).read_text()[-3000:]}")


def _artifacts(api, flow_run_id: str) -> list[dict]:
    """The run's artifacts, its tasks' included."""
    return api.post("/artifacts/filter", json={
        "artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}).raise_for_status().json()


def _report_links(api, flow_run_id: str) -> list[tuple[dict, str]]:
    """Link artifacts of the run (a link is a markdown artifact `[text](url)`) to an HTML report."""
    return [(a, m.group(1)) for a in _artifacts(api, flow_run_id) if isinstance(a.get("data"), str)
            for m in [REPORT_LINK.search(a["data"])] if m]


def test_a_stage_run_from_the_ui_links_its_report(served, tiny_inputs, browser, tmp_path):
    with _screenshots_on_failure(browser, tmp_path):
        _drive_a_stage_run(served, tiny_inputs, browser)


def _drive_a_stage_run(served, tiny_inputs, browser):
    import httpx
    from playwright.sync_api import expect

    root, state = served
    model_dir, corpus = tiny_inputs
    api = httpx.Client(base_url=state.api_url, timeout=30)
    deployment = api.get(f"/deployments/name/{DEPLOYMENT}/{DEPLOYMENT}").raise_for_status().json()
    page = browser.new_page()

    # Deployments -> train_heads -> Run -> Custom run: typed sections with their help text
    _open_custom_run(page, state.ui_url, DEPLOYMENT)
    model, data, extract, heads = (_field(page, s) for s in ("model", "data", "extract", "heads"))
    assert "local folder" in _field(model, "Source").inner_text()  # the field's help, from the config docstring
    _fill(model, "Source", str(model_dir))
    _fill(data, "Source", str(corpus))
    _fill(data, "Seq Len", "32")
    layer_inputs = _field(extract, "Layers").locator("input").all()
    assert len(layer_inputs) == 4  # the default [6, 12, 18, 24], one number field each
    for layer, box in enumerate(layer_inputs, start=1):
        box.fill(str(layer))
    _fill(extract, "Chunk Tokens", "256")
    _fill(extract, "Max Tokens", "2048", kind="int")
    for label, value in (("Epochs", "1"), ("Batch Tokens", "256"), ("Warmup Steps", "2"), ("Negatives", "64")):
        _fill(heads, label, value)
    page.get_by_role("button", name="Submit", exact=True).click()

    run = _wait_for_run(api, deployment["id"], next(p.log for p in state.processes if p.name == "worker"))
    assert run["state_type"] == "COMPLETED", run["state"]
    params = run["parameters"]  # the form sent typed sections, not strings
    assert params["model"]["source"] == str(model_dir) and params["data"]["seq_len"] == 32
    assert params["extract"]["layers"] == [1, 2, 3, 4] and params["extract"]["max_tokens"] == 2048
    assert params["heads"]["epochs"] == 1
    assert params.get("root") is None  # the worker's EXITFLOW_HOME: the served root
    store = ArtifactStore(root)
    (train_cache,) = [m for m in store.iter_manifests("extract") if m.extra.get("split") == "train"]
    tokens = train_cache.metrics["tokens"]
    assert 0 < tokens <= 2048

    # the run page's Artifacts tab -> the report link -> the HTML report
    links = _report_links(api, run["id"])
    assert links, ("the run published no link artifact to a report.html; its artifacts: "
                   f"{[(a.get('key'), a['type']) for a in _artifacts(api, run['id'])]}")
    artifact, url = links[0]
    assert url.startswith(state.reports_url + "/")
    page.goto(f"{state.ui_url}/runs/flow-run/{run['id']}", wait_until="networkidle")
    page.get_by_text("Artifacts", exact=True).click()
    for key in sorted({a["key"] for a in _artifacts(api, run["id"]) if a.get("key")}):  # summaries, tables, the link
        expect(page.get_by_text(key, exact=True).first).to_be_visible()
    if artifact.get("key"):
        page.get_by_text(artifact["key"], exact=True).first.click()
    else:
        page.goto(f"{state.ui_url}/artifacts/artifact/{artifact['id']}")
    page.wait_for_url("**/artifacts/artifact/**")
    link = page.locator(f"a[href='{url}']").first
    with browser.expect_page() as opened:  # the markdown link opens a new tab
        link.click()
    report = opened.value
    report.wait_for_load_state("load")
    assert report.url == url
    images = report.evaluate("Array.from(document.images).map(i => ({src: i.src, ok: i.complete && i.naturalWidth > 0}))")
    assert images, "the report has no plots"
    assert all(img["ok"] for img in images), [img["src"] for img in images if not img["ok"]]
    text = report.inner_text("body")
    assert str(tokens) in text or f"{tokens:,}" in text, f"the train cache's {tokens} tokens are not in the report"
    (heads,) = store.iter_manifests("train_heads")
    for key in (train_cache.key, heads.key):  # this run's artifacts, not another's
        assert key[:12] in text, f"{key[:12]} is not in the report"

    # the index of reports, served beside them, links this one
    page.goto(state.reports_index_url, wait_until="load")
    assert url in page.eval_on_selector_all("a[href$='report.html']", "links => links.map(a => a.href)")
