import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from data_shards.build.synth import write_synthetic_dataset  # noqa: E402


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
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
                                       "PYTHONPATH": python_path}})
    yield ray
    ray.shutdown()
