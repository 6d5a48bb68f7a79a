"""The MLflow UI as a person sees it: a real server, a real recording and replay, headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import REPO, run_cli, run_script

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("REPRO_TRACK_TEST_ARTIFACTS", REPO / "test-artifacts"))

if CHROMIUM is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI needs Chromium for the browser test: `make test` installs it with apt")
    pytest.skip("Chromium is not installed (make test installs it)", allow_module_level=True)

_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def recorded(mlflow_server, model_dir, tmp_path_factory):
    """The DDIM example recorded into the server and replayed once through the CLI."""
    work = tmp_path_factory.mktemp("browser")
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.url, "REPRO_TRACK_MODEL_DIR": str(model_dir),
           "REPRO_TRACK_SPOOL_DIR": str(work / "spool")}
    done = run_script(REPO / "examples" / "ddim_cpu.py", "--run-id-file", str(work / "run_id"), env=env,
                      cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = (work / "run_id").read_text().strip()
    replayed = run_cli("replay", run_id, "--json", "--project-dir", str(REPO), env=env, cwd=work)
    assert replayed.returncode == 0, replayed.stderr[-3000:]
    assert replayed.stdout.strip(), replayed.stderr[-3000:]
    assert replayed.stdout.startswith("{"), replayed.stdout[:2000]
    report = json.loads(replayed.stdout)
    from mlflow.tracking import MlflowClient

    experiment_id = MlflowClient(mlflow_server.url).get_run(run_id).info.experiment_id
    return {"run_id": run_id, "replay_id": report["replay_run_id"], "experiment_id": experiment_id,
            "url": mlflow_server.url}


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium driven by Playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=_ARGS)
        yield chromium
        chromium.close()


def _open_run(browser, recorded, run_id):
    page = browser.new_page(viewport={"width": 1400, "height": 1600})
    page.goto(f"{recorded['url']}/#/experiments/{recorded['experiment_id']}/runs/{run_id}")
    page.get_by_text("repro-track", exact=False).first.wait_for(timeout=60_000)
    more = page.get_by_text("Show more")
    if more.count():
        more.first.click()
    return page


class TestRecordedRunPage:
    """The original run's page shows the card, an output image and the link to its replay."""

    def test_card_image_and_replay_link(self, browser, recorded):
        page = _open_run(browser, recorded, recorded["run_id"])
        image = page.locator("img[src*='get-artifact']").first
        image.wait_for(timeout=30_000)
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "run-page.png"), full_page=True)
        text = page.inner_text("body")
        assert "Seed: 0 on a cpu generator" in text
        assert f"repro-track replay {recorded['run_id']}" in text
        assert "What would stop exact reproduction" in text
        link = page.locator(f"a[href*='{recorded['replay_id']}']")
        assert link.count() >= 1
        assert "expected exact, observed exact" in text
        assert "repro.gpu" in text and "repro.cpu_capability" in text


class TestReplayRunPage:
    """The replay's page says what it replayed, expected versus observed, and links back."""

    def test_replay_card(self, browser, recorded):
        page = _open_run(browser, recorded, recorded["replay_id"])
        page.get_by_text("replay of run").first.wait_for(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "replay-page.png"), full_page=True)
        text = page.inner_text("body")
        assert "Expected: exact" in text and "Observed: exact" in text
        assert page.locator(f"a[href*='{recorded['run_id']}']").count() >= 1


SWEEP_SCRIPT = '''
import json
import sys

import numpy as np

import repro_track


@repro_track.record(experiment="browser-sweep")
def sweep(seed: int, num_inference_steps: int = 4) -> np.ndarray:
    """A tiny seeded image, as a pipeline with output_type="np" returns one."""
    return np.random.default_rng(seed).random((1, 8, 8, 3)).astype(np.float32)


ids = []
for seed in (1, 2, 3):
    sweep(seed)
    ids.append(repro_track.last_recording(sweep).wait(120))
print(json.dumps(ids))
'''


@pytest.fixture(scope="module")
def sweep(mlflow_server, tmp_path_factory):
    """A seed sweep of three runs recorded into the server, each with one output image."""
    work = tmp_path_factory.mktemp("browser-sweep")
    (work / "sweep.py").write_text(SWEEP_SCRIPT, "utf-8")
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.url, "REPRO_TRACK_SPOOL_DIR": str(work / "spool")}
    done = run_script(work / "sweep.py", env=env, cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    ids = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(ids), done.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    experiment_id = MlflowClient(mlflow_server.url).get_run(ids[0]).info.experiment_id
    return {"ids": ids, "experiment_id": experiment_id, "url": mlflow_server.url}


def _chart_view(browser, sweep, run_ids):
    """The experiment's runs in the chart (compare) view, filtered to ``run_ids``."""
    from urllib.parse import quote

    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    where = quote("attributes.run_id IN (" + ",".join(f"'{i}'" for i in run_ids) + ")", safe="")
    page.goto(f"{sweep['url']}/#/experiments/{sweep['experiment_id']}/runs?compareRunsMode=CHART"
              f"&searchFilter={where}")
    page.get_by_text(f"{len(run_ids)} matching runs").first.wait_for(timeout=60_000)
    return page


def _shown_images(page, run_ids):
    """Wait until each run's logged image is shown (loaded, not just referenced); return their count."""
    for run_id in run_ids:
        image = page.locator(f"img[src*='images%2Foutput'][src*='{run_id}']").first
        image.wait_for(timeout=60_000)
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    return page.locator("img[src*='images%2Foutput']").count()


class TestImageGrid:
    """Output images are MLflow images: the sweep's grid and the compare view show them."""

    def test_seed_sweep_in_the_image_grid(self, browser, sweep):
        page = _chart_view(browser, sweep, sweep["ids"])
        assert _shown_images(page, sweep["ids"]) >= 3
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "seed-sweep-image-grid.png"), full_page=True)

    def test_compare_view_of_two_runs_shows_both_images(self, browser, sweep):
        pair = sweep["ids"][:2]
        page = _chart_view(browser, sweep, pair)
        _shown_images(page, pair)
        assert page.locator(f"img[src*='images%2Foutput'][src*='{sweep['ids'][2]}']").count() == 0
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "compare-two-runs.png"), full_page=True)
