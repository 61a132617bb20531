"""Everything that runs inside one training worker: model, engine, loop, export."""
