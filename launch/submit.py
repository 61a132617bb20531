"""`valleyforge submit` and `valleyforge jobs`: a config run as a Ray job on a running cluster,
through Ray's Job Submission API (the dashboard's job server, `http://HEAD:8265`).

What travels: one zip, the job's working directory: the project this command runs in (its
.gitignore honoured; runs/, mlruns/, data/ and virtual environments left out) plus the resolved
config as `valleyforge-job.yaml`; the tracking URI; and, unless `--no-install`, ValleyForge's
pinned requirements (without torch and Ray: the cluster's own CUDA torch and Ray stay).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

from data_shards.errors import ValleyForgeError
from launch.config import JobConfig

JOB_CONFIG = "valleyforge-job.yaml"
LEFT_OUT = [
    "/runs/",
    "/mlruns/",
    "/data/",
    "/mlflow.db",
    ".venv/",
    "venv/",
    ".git/",
    "__pycache__/",
    "*.egg-info/",
    ".pytest_cache/",
]
CODE = Path(__file__).resolve().parents[1]  # ValleyForge's source tree: its packages and requirements.lock
PACKAGES = ("data_shards", "trainer", "launch")
CLUSTER_OWNS = {"torch", "ray"}  # never installed over the cluster's own (a CUDA torch, the Ray it runs)
UPLOAD_LIMIT = 100 * 1024**2  # the job server's request size limit
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}


class JobServerError(ValleyForgeError):
    """The job server could not be reached, refused us, or does not know the job."""

    exit_code = 1


def job_server_address(address: str | None) -> str:
    """`--address`, else RAY_API_SERVER_ADDRESS, else an http RAY_ADDRESS (as `ray job` reads them)."""
    for value in (address, os.environ.get("RAY_API_SERVER_ADDRESS"), os.environ.get("RAY_ADDRESS")):
        if value and (value is address or value.startswith(("http://", "https://"))):
            return value if "://" in value else f"http://{value}"
    raise ValleyForgeError("--address: the Ray job server's URL, e.g. http://HEAD:8265 (or set RAY_API_SERVER_ADDRESS)")


def auth_token() -> str | None:
    """The cluster token as Ray finds it: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if path.is_file():
        lines = path.read_text().strip().splitlines()
        return lines[0].strip() if lines else None
    return None


@contextmanager
def _job_server_errors(address: str):
    """Ray's connection and token errors, told in one line naming the server."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as err:
        first = str(err).strip().splitlines()[0]
        raise JobServerError(
            f"the Ray job server at {address} refused the request ({first}): set RAY_AUTH_TOKEN "
            f"or ~/.ray/auth_token to the cluster's token"
        ) from None
    except ConnectionError:
        raise JobServerError(
            f"cannot reach a Ray job server at {address}: is the head running with its "
            f"dashboard (ray[default]) and is the port right?"
        ) from None
    except RuntimeError as err:  # how Ray's job client tells of a request the server refused or failed
        last = (str(err).strip().splitlines() or [type(err).__name__])[-1]
        if "status code 404" in str(err):
            raise JobServerError(f"{address}: no such job ({last})") from None
        raise JobServerError(f"the Ray job server at {address} failed the request ({last})") from None


class JobServer:
    """A client of one cluster's job server, token included."""

    def __init__(self, address: str | None):
        from ray.job_submission import JobSubmissionClient

        self.address = job_server_address(address)
        token = auth_token()
        headers = {"Authorization": f"Bearer {token}"} if token else None
        saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
        try:  # Ray's client would take these over the address it is given
            with _job_server_errors(self.address):
                self.client = JobSubmissionClient(self.address, headers=headers)
        finally:
            os.environ.update(saved)

    def call(self, method: str, *args, **kwargs):
        with _job_server_errors(self.address):
            return getattr(self.client, method)(*args, **kwargs)

    def status(self, job_id: str) -> str:
        return self.call("get_job_status", job_id).value

    def wait(self, job_id: str, timeout_s: float | None = None) -> str:
        """The job's status once it is final (or when `timeout_s` has passed)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            status = self.status(job_id)
            if status in EXIT_CODES or (deadline is not None and time.monotonic() > deadline):
                return status
            time.sleep(1.0)

    def follow(self, job_id: str, out=sys.stdout) -> int:
        """Streams the job's log until it ends; the exit code of its outcome (0 succeeded, 1 failed,
        3 stopped)."""

        async def tail():
            async for chunk in self.client.tail_job_logs(job_id):
                out.write(chunk)
                out.flush()

        with _job_server_errors(self.address):
            asyncio.run(tail())
        status = self.wait(job_id)
        info = self.call("get_job_info", job_id)
        print(
            f"job {job_id}: {status}" + (f" ({info.message})" if status != "SUCCEEDED" and info.message else ""),
            file=sys.stderr if status != "SUCCEEDED" else out,
        )
        return EXIT_CODES[status]


def pinned_requirements() -> list[str]:
    """requirements.lock without what the cluster brings itself."""
    lock = CODE / "requirements.lock"
    if not lock.is_file():
        raise ValleyForgeError(
            f"{lock}: ValleyForge's pinned requirements are not beside its code; submit from a "
            f"ValleyForge checkout, or with --no-install to a cluster whose image has ValleyForge"
        )
    lines = [line.split("#")[0].strip() for line in lock.read_text().splitlines()]
    return [line for line in lines if line and line.split("==")[0].lower() not in CLUSTER_OWNS]


def job_package(project: Path, cfg: JobConfig, folder: Path) -> Path:
    """The job's working directory as a zip: the project (as Ray packs a working_dir, with
    LEFT_OUT added to its excludes) and the resolved config."""
    from ray._private.runtime_env.packaging import create_package

    package = folder / "valleyforge-job.zip"
    create_package(
        str(project), package, include_gitignore=True, excludes=LEFT_OUT, logger=logging.getLogger(__name__)
    )  # no INFO line on the console
    with zipfile.ZipFile(package, "a") as archive:
        archive.writestr(JOB_CONFIG, cfg.to_yaml())
    if package.stat().st_size > UPLOAD_LIMIT:
        with zipfile.ZipFile(package) as archive:
            biggest = sorted(archive.infolist(), key=lambda i: -i.compress_size)[:3]
        raise ValleyForgeError(
            f"{project}: the job's working directory packs to "
            f"{package.stat().st_size / 2**20:.0f} MiB, over the job server's 100 MiB; largest: "
            + ", ".join(f"{i.filename} ({i.compress_size / 2**20:.0f} MiB)" for i in biggest)
            + " (add them to .gitignore or .rayignore, or run from a smaller folder)"
        )
    return package


def runtime_env(package: Path, project: Path, tracking_uri: str, install: bool, stop_wait_s: int) -> dict:
    """The job's runtime environment. `stop_wait_s`: how long `jobs stop` lets the driver stop the
    stage after its SIGTERM (finish the step and save it) before SIGKILL; Ray's default is 3 s."""
    env_vars = {"MLFLOW_TRACKING_URI": tracking_uri, "RAY_JOB_STOP_WAIT_TIME_S": str(stop_wait_s)}
    env = {"working_dir": str(package), "env_vars": env_vars}
    if install:
        env["pip"] = {"packages": pinned_requirements(), "pip_check": False}
        if project.resolve() != CODE:  # ValleyForge's own code travels beside the project's
            env["py_modules"] = [str(CODE / name) for name in PACKAGES]
    return env


def cluster_job_config(cfg: JobConfig) -> JobConfig:
    """The config as the job runs it: local inputs absolute (as this machine names them); no
    `cluster.address`: a submitted job runs on the cluster it was submitted to (RAY_ADDRESS); a
    relative output directory under ~/valleyforge on the head node, not in the job's working
    directory, which Ray manages and may unpack again."""
    cfg = cfg.with_absolute_paths()
    output_dir = (
        cfg.output_dir if Path(cfg.output_dir).expanduser().is_absolute() else f"~/valleyforge/{cfg.output_dir}"
    )
    return cfg.model_copy(
        update={"output_dir": output_dir, "cluster": cfg.cluster.model_copy(update={"address": None})}
    )


def submit(server: JobServer, cfg: JobConfig, tracking_uri: str, install: bool, project: Path) -> str:
    """Submits `valleyforge run` for the config (as `cluster_job_config` made it); the job's
    submission id."""
    with tempfile.TemporaryDirectory(prefix="valleyforge-submit-") as tmp:
        package = job_package(project, cfg, Path(tmp))
        return server.call(
            "submit_job",
            entrypoint=f"python -m launch.cli run {JOB_CONFIG}",
            submission_id=f"valleyforge-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            runtime_env=runtime_env(package, project, tracking_uri, install, cfg.cluster.preemption_grace_s),
            metadata={"valleyforge_config": cfg.name, "config_hash": cfg.digest()},
        )


def job_table(server: JobServer) -> list[str]:
    """One line per submitted job, newest first."""
    jobs = [job for job in server.call("list_jobs") if job.submission_id]
    jobs.sort(key=lambda job: job.start_time or 0, reverse=True)
    lines = []
    for job in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) if job.start_time else "-"
        lines.append(f"{job.submission_id:<48} {job.status.value:<10} {started}  {job.entrypoint}")
    return lines
