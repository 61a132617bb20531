"""Checks in a real browser that the MLflow UI reads a finished job as a training system: the
experiment in the model-training view with the job's run, each stage run's loss chart and system
metrics, and each registered version's description and alias. Headless Chromium from Debian's
packages, driven by Playwright; `mlflow ui` is started here on the job's tracking store.

    apt-get install chromium && pip install playwright
    valleyforge demo --set output_dir=/tmp/demo          # or any finished job
    python bench/check_mlflow_ui.py --tracking-uri sqlite:///mlflow.db --job demo --out /tmp/ui

Prints one line per check and exits 1 if any fails; screenshots of the pages go to OUT.
"""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlflow import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from launch.tracking import ui_path  # noqa: E402

CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(tracking_uri: str, port: int) -> subprocess.Popen:
    ui = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            tracking_uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return ui
        except OSError:
            time.sleep(1)
    ui.kill()
    raise SystemExit(f"mlflow ui on port {port} did not answer within 120 s")


def markdown_text(line: str) -> str:
    """A description line as the UI renders it (markdown emphasis and code marks gone)."""
    return re.sub(r"[*`]", "", line).lstrip("- ")


class Checks:
    def __init__(self, page, base: str, out: Path):
        self.page, self.base, self.out, self.failed = page, base, out, 0

    def visit(self, path: str, shot: str) -> None:
        self.page.goto(self.base + path)
        self.page.wait_for_load_state("domcontentloaded")  # the UI keeps polling: no network idle
        self.shot = self.out / f"{shot}.png"

    def expect(self, what: str, text: str, timeout_ms: int = 30_000) -> None:
        try:
            self.page.get_by_text(text, exact=False).first.wait_for(timeout=timeout_ms)
            print(f"ok      {what}", flush=True)
        except Exception as err:  # noqa: BLE001 - reported, then the next check
            self.failed += 1
            print(f"FAILED  {what}: {text!r} not shown ({type(err).__name__})", flush=True)
        self.page.screenshot(path=str(self.shot))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--job", required=True, help="the job's name (its config's `name`)")
    parser.add_argument("--experiment", default="valleyforge-demo")
    parser.add_argument("--out", type=Path, default=Path("runs/ui-check"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright

    client = MlflowClient(args.tracking_uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"{args.tracking_uri}: no experiment {args.experiment!r}")
    jobs = client.search_runs(
        [experiment.experiment_id],
        f"attributes.run_name = '{args.job}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not jobs:
        raise SystemExit(f"{args.tracking_uri}: no run of job {args.job!r} in {args.experiment!r}")
    job = jobs[0]
    stages = client.search_runs(
        [experiment.experiment_id],
        f"tags.mlflow.parentRunId = '{job.info.run_id}'",
        order_by=["attributes.start_time ASC"],
    )
    # each version read whole: a search leaves out aliases
    versions = [
        client.get_model_version(v.name, v.version)
        for run in stages
        for v in client.search_model_versions(f"run_id = '{run.info.run_id}'")
    ]

    port = free_port()
    ui = start_ui(args.tracking_uri, port)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            checks = Checks(page, f"http://127.0.0.1:{port}/", args.out)
            checks.visit(ui_path(experiment.experiment_id), "experiment")
            checks.expect("the experiment opens in the model-training view, listing the job's run", args.job)
            checks.expect("... as a table of training runs", "Run Name")
            for run in stages:
                stage = run.info.run_name
                checks.visit(ui_path(experiment.experiment_id, run.info.run_id, "model-metrics"), f"{stage}-metrics")
                page.get_by_placeholder("Search metric charts").fill("train/loss")
                checks.expect(f"stage run {stage}: its loss chart", f"{stage} (train/loss)")
                checks.visit(ui_path(experiment.experiment_id, run.info.run_id, "system-metrics"), f"{stage}-system")
                checks.expect(
                    f"stage run {stage}: its system metrics (CPU chart drawn)",
                    f"{stage} (system/cpu_utilization_percentage)",
                )
            for version in versions:
                name = f"{version.name} version {version.version}"
                checks.visit(f"#/models/{version.name}/versions/{version.version}", f"{version.name}-{version.version}")
                first_line = (version.description or "").splitlines()[:1]
                if not first_line:
                    checks.failed += 1
                    print(f"FAILED  {name}: no description in the registry", flush=True)
                    continue
                checks.expect(f"{name}: its description", markdown_text(first_line[0]))
                for alias in version.aliases:
                    checks.expect(f"{name}: its alias {alias}", f"@ {alias}")
            browser.close()
    finally:
        ui.terminate()
    print(
        f"{checks.failed} check(s) failed; screenshots in {args.out}"
        if checks.failed
        else f"every check passed; screenshots in {args.out}"
    )
    sys.exit(1 if checks.failed else 0)


if __name__ == "__main__":
    main()
