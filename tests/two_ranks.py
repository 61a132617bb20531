"""Running a test's worker function on 2 gloo ranks under Ray Train, as the launcher does."""
import ray.train
import torch
from ray.train import ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from data_shards.reader import Topology


def fit_on_two_ranks(worker, config: dict, storage, timeout_s: int = 1800) -> None:
    """`worker(config)` on 2 CPU ranks; a collective that waits past `timeout_s` fails the run."""
    TorchTrainer(worker, train_loop_config=config, torch_config=TorchConfig(backend="gloo", timeout_s=timeout_s),
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=ray.train.RunConfig(storage_path=str(storage))).fit()


def worker_topology() -> Topology:
    """Inside a worker: one intra-op thread (2 ranks share 2 cores) and this rank's place."""
    torch.set_num_threads(1)
    context = ray.train.get_context()
    return Topology(context.get_world_rank(), context.get_world_size())
