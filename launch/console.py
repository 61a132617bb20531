"""Keep the console for our own lines: library logging and warnings go to a log file."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path


def quiet_libraries(log_file: Path) -> None:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    for var, value in {
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }.items():
        os.environ.setdefault(var, value)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    for name in list(logging.root.manager.loggerDict):  # every library logger: to the file only
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.captureWarnings(True)
    warnings.simplefilter("default")
