"""The model and how it trains: blueprint, engine, stage runner, checkpoint, export. Workers run
the training; loading an export, generation and evaluation serve the driver and the CLI too."""
