"""The driver: the CLI (cli), the job config (config, a leaf) and the stage sequence
(pipeline), which uses one module per job: inputs (shard lists, where a stage starts, the
StageJob), stage_on_ray (Ray, the TorchTrainer, the inbox loop) with stage_relay (the workers'
mail to the console, MLflow and the logs), stage_registry (reuse, registration, descriptions and
promotion; versions.py, checkpoint_registry.py). The worker's side of Ray is worker (with inbox
and worker_logs); MLflow calls go through tracking and tracking_queue; submit and kuberay send a
job to a cluster.

Imports: trainer, data_shards and third-party libraries; the driver is the only MLflow client."""
