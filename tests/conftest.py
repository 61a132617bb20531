import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from data_shards.write.synth import write_synthetic_dataset  # noqa: E402

# What a test starts, lightest first; every test carries exactly one of these, the heaviest that
# applies (a cluster test may start a local Ray too). `pytest -m unit` runs the quick ones.
KINDS = {
    "unit": "starts nothing but the test process and short-lived subprocesses it waits for (the CLI, a "
    "reader child): no Ray, no gloo process group, no server process",
    "ray": "starts an embedded Ray on this machine (the ray_local fixture, a TorchTrainer, a Pipeline)",
    "cluster": "starts separate services: the two-node Ray cluster, the S3 store (moto) or an `mlflow server`",
}
# A fixture that starts something, and the least kind a test using it (directly or not) must have.
STARTS = {
    "ray_local": "ray",
    "object_store": "cluster",
    "mlflow_server": "cluster",
    "two_node_cluster": "cluster",
    "store_data": "cluster",
}


def pytest_configure(config):
    for name, meaning in KINDS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")


def pytest_collection_modifyitems(config, items):
    order, problems = list(KINDS), []
    for item in items:
        kinds = [name for name in KINDS if item.get_closest_marker(name)]
        if not kinds:
            problems.append(f"{item.nodeid}: no marker; mark it pytest.mark.unit, .ray or .cluster by what it starts")
            continue
        if len(kinds) > 1:
            problems.append(
                f"{item.nodeid}: marked {' and '.join(kinds)}; keep one, the heaviest it starts ({' < '.join(KINDS)})"
            )
            continue
        needs = [(fixture, STARTS[fixture]) for fixture in item.fixturenames if fixture in STARTS]
        too_light = [f"{fixture} ({kind})" for fixture, kind in needs if order.index(kind) > order.index(kinds[0])]
        if too_light:
            problems.append(f"{item.nodeid}: marked {kinds[0]} but uses {', '.join(too_light)}")
    if problems:
        raise pytest.UsageError("tests/conftest.py: every test says what it starts:\n  " + "\n  ".join(problems))


@pytest.fixture(autouse=True)
def _unit_tests_start_no_ray(request):
    """A `unit` test that leaves an embedded Ray running (where none ran before it) fails."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    ray = sys.modules.get("ray")
    before = ray is not None and ray.is_initialized()
    yield
    ray = sys.modules.get("ray")
    if not before and ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail(f"{request.node.nodeid} is marked unit but started Ray: mark it ray", pytrace=False)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """A small synthetic dataset (captions + instruct, train + held-out) shared by the tests."""
    out = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(out, train_samples=256, heldout_samples=32, samples_per_shard=32, progress=lambda _: None)
    return out


@pytest.fixture(scope="session")
def ray_local():
    """An embedded Ray with room for two 1-CPU training workers."""
    import ray

    # Workers import the test modules' worker functions by name.
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    python_path = os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={
            "env_vars": {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": python_path}
        },
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def object_store(tmp_path_factory):
    """An S3-compatible store (moto's server mode) with one bucket."""
    from cluster_parts import start_object_store, stop_group

    store = start_object_store(tmp_path_factory.mktemp("object-store"))
    yield store
    stop_group(store.process)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, object_store):
    """An `mlflow server` on 127.0.0.1, its artifacts in the object store; yields its URI."""
    from cluster_parts import start_mlflow_server, stop_group

    process, uri = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), object_store)
    yield uri
    stop_group(process)


@pytest.fixture(scope="session")
def two_node_cluster(tmp_path_factory, object_store):
    """One Ray cluster of two 1-CPU nodes for every cluster test; the second node sees an empty
    tmpfs over `run_dir`. Like any cluster node, each has the object store's credentials in its
    environment."""
    if os.geteuid() != 0:
        pytest.skip(reason="the second node's mount namespace (unshare + tmpfs) needs root")
    from cluster_parts import start_two_node_cluster

    run_dir = tmp_path_factory.mktemp("cluster-run")
    cluster = start_two_node_cluster(
        run_dir,
        tmp_path_factory.mktemp("cluster-logs"),
        {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", **object_store.env},
    )
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def store_data(object_store, synth_data):
    """The synthetic train splits, uploaded to the object store; their shard globs."""
    fs, urls = object_store.filesystem(), {}
    for split in ("captions", "instruct"):
        target = f"{object_store.bucket}/data/{split}/train"
        fs.put(sorted(str(p) for p in (synth_data / split / "train").glob("shard-*.tar")), target + "/")
        urls[split] = f"s3://{target}/shard-*.tar"
    return urls
