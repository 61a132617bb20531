"""The driver: CLI, config resolution, Ray orchestration, MLflow tracking and registry."""
