"""Real services for the cluster tests, each a process of its own on 127.0.0.1: an S3-compatible
object store (moto's server mode), an `mlflow server` with its artifacts in that store, and a
Ray cluster of two nodes whose second node does not see the run directory: it runs in its own
mount namespace with an empty tmpfs over it, as a node without a shared disk would."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited ({process.returncode}): {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s: {log.read_text()[-2000:]}")


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the process group the process leads (start_new_session)."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue


@dataclass
class ObjectStore:
    """moto's S3 server; `env` holds what a client needs to reach it."""

    process: subprocess.Popen
    endpoint: str
    bucket: str

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=self.endpoint)


def start_object_store(folder: Path) -> ObjectStore:
    port, log = free_port(), folder / "moto.log"
    process = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    store = ObjectStore(process, f"http://127.0.0.1:{port}", "valleyforge-test")
    wait_for_http(store.endpoint + "/moto-api/", process, log)
    store.filesystem().mkdir(store.bucket)
    return store


def start_mlflow_server(
    folder: Path, store: ObjectStore | None, port: int | None = None
) -> tuple[subprocess.Popen, str]:
    """An `mlflow server` over HTTP: runs in a sqlite database in `folder`, artifacts in the object
    store (or in `folder` without one). Started again on the same folder and port, it is the same
    server after an outage."""
    port, log = port or free_port(), folder / "mlflow-server.log"
    artifacts = f"s3://{store.bucket}/mlflow-artifacts" if store else str(folder / "artifacts")
    process = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{folder / 'mlflow.db'}",
            "--artifacts-destination",
            artifacts,
        ],
        env={**os.environ, **(store.env if store else {})},
        stdout=open(log, "a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    wait_for_http(uri + "/health", process, log)
    return process, uri


@dataclass
class TwoNodeCluster:
    address: str
    dashboard: str  # the job server, http://127.0.0.1:PORT
    env: dict[str, str]  # what a client of this cluster needs (token authentication)
    run_dir: Path  # the directory the second node does not see
    nodes: list[subprocess.Popen]
    node_env: dict[str, str]  # every node's environment
    logs: Path

    def start_second_node(self) -> None:
        """The second node, in a mount namespace with an empty tmpfs over `run_dir`."""
        second = (
            f"mount -t tmpfs tmpfs {self.run_dir} && exec {BIN / 'ray'} start --address={self.address} "
            f"--dashboard-agent-listen-port={free_port()} " + " ".join(NODE_ARGS)
        )
        self.nodes.append(
            subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "bash", "-c", second],
                env=self.node_env,
                stdout=open(self.logs / "ray-second-node.log", "a"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        _wait_for_nodes(self.address, self.node_env, 2, self.nodes[-1])

    def lose_second_node(self) -> None:
        """Every process of the second node (its raylet, the workers it started in sessions of their
        own) killed at once, as when a machine goes away."""
        node = self.nodes.pop()
        for process in [*psutil.Process(node.pid).children(recursive=True), psutil.Process(node.pid)]:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        node.wait()

    def drain_second_node(self, deadline_s: int) -> str:
        """What Ray's autoscaler does on a spot reclaim of the second node: a drain for preemption
        with a deadline, after which the node is to be killed (by the caller: lose_second_node).
        Returns the node's id."""
        probe = (
            f"import ray; ray.init(address='{self.address}', log_to_driver=False, configure_logging=False); "
            f"print([n['NodeID'] for n in ray.nodes() if n['Alive'] and "
            f"'node:__internal_head__' not in n['Resources']][0])"
        )
        found = subprocess.run([sys.executable, "-c", probe], env=self.node_env, capture_output=True, text=True)
        assert found.returncode == 0, found.stderr
        node_id = found.stdout.split()[-1]
        drain = subprocess.run(
            [str(BIN / "ray"), "drain-node", f"--address={self.address}", f"--node-id={node_id}"]
            + ["--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=spot reclaim"]
            + [f"--deadline-remaining-seconds={deadline_s}"],
            env=self.node_env,
            capture_output=True,
            text=True,
        )
        assert drain.returncode == 0, drain.stdout + drain.stderr
        return node_id

    def stop(self) -> None:
        for node in reversed(self.nodes):
            stop_group(node)


NODE_ARGS = ["--num-cpus=1", "--disable-usage-stats", "--block"]
# A lost node is noticed within seconds (Ray's defaults take up to a minute).
FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def start_two_node_cluster(run_dir: Path, logs: Path, node_env: dict[str, str]) -> TwoNodeCluster:
    """A head node (with its dashboard and job server) and a second node that sees an empty
    tmpfs over `run_dir`; one CPU each, so a 2-worker job places one worker on each node. Ray
    2.60 authenticates every node and client with a token. The nodes' `python` is this one, as
    on a node whose environment is activated."""
    port, dashboard_port = free_port(), free_port()
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    full_env = {
        **os.environ,
        **node_env,
        **env,
        **FAST_HEALTH_CHECKS,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    # Each node's dashboard agent gets a free port: the default one may be held by a Ray started
    # earlier on this machine, and a head whose agent cannot listen accepts no job.
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            f"--port={port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--dashboard-agent-listen-port={free_port()}",
            *NODE_ARGS,
        ],
        env=full_env,
        stdout=open(logs / "ray-head.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    cluster = TwoNodeCluster(address, f"http://127.0.0.1:{dashboard_port}", env, run_dir, [head], full_env, logs)
    try:
        _wait_for_nodes(address, full_env, 1, head)
        cluster.start_second_node()
        wait_for_http(f"{cluster.dashboard}/api/gcs_healthz", head, logs / "ray-head.log")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_for_nodes(address: str, env: dict, count: int, process: subprocess.Popen, timeout_s: float = 120) -> None:
    probe = (
        f"import ray; ray.init(address='{address}', log_to_driver=False, configure_logging=False); "
        f"print(sum(n['Alive'] for n in ray.nodes()))"
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args}: exited ({process.returncode})")
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(1)
    raise RuntimeError(f"the Ray cluster at {address} did not reach {count} nodes within {timeout_s} s")
