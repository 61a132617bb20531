"""Everything that runs inside one training worker, and the model code the driver and the CLI
share: the config sections (config.py, a leaf) and the stage job (job.py); the model
(model, visual reducers and projectors, packed attention, token reduction, contrastive towers,
LoRA, the LLaVA-NeXT-Video twin); building it (blueprint, trainable, engine); the stage runner
and its step loop (stage), the global batch over the ranks (layout), the checkpointer and its
parts (checkpoint, resumable, checkpoint_universal, checkpoint_export), storage, ranks,
throughput, system metrics; export, generate and evaluation (the driver and the CLI use these).

Imports: data_shards and third-party libraries, never launch. The model modules import neither
the reader nor DeepSpeed, Ray or MLflow (tests/test_layout.py)."""
