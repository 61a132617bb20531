"""What a registered stage version says about itself, and the alias that follows the best one.

A version's description: the recipe and stage, the data, the steps, the final losses and every
evaluation figure of its stage run. `tracking.promote_alias` (e.g. `champion`) moves to a new
version when its evaluation beats the version holding the alias; the decision is written to the
new version (tag `promotion`) and the driver's console either way.
"""

from __future__ import annotations

from dataclasses import dataclass

# Compared in this order: the first one the new version's run has decides.
PROMOTION_METRICS = (
    ("eval/attribute_accuracy", "higher"),
    ("eval/retrieval/video_to_text_r1", "higher"),
    ("eval/loss", "lower"),
)


@dataclass
class StageRecord:
    """What the description tells of one stage's registered version."""

    recipe: str
    stage: str
    objective: str
    data: str  # the stage's sources, with weights
    data_manifest_hash: str
    steps: int
    chosen: str  # which step's weights, and how chosen
    started_from: str


def describe(record: StageRecord, metrics: dict[str, float]) -> str:
    """Markdown for the version's description (the registry UI renders it)."""
    final = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("train/loss", "eval/loss") if k in metrics) or "none logged"
    figures = (
        ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()) if k.startswith("eval/") and k != "eval/loss")
        or "none"
    )
    return "\n".join(
        [
            f"**{record.recipe}**, stage `{record.stage}` ({record.objective})",
            f"- data: {record.data} (manifest {record.data_manifest_hash[:12]})",
            f"- steps: {record.steps}; weights of {record.chosen}",
            f"- final losses: {final}",
            f"- evaluation: {figures}",
            f"- started from: {record.started_from}",
        ]
    )


def promotion_metric(metrics: dict[str, float]) -> tuple[str, str] | None:
    return next(((key, better) for key, better in PROMOTION_METRICS if key in metrics), None)


def promote(client, name: str, version: str, alias: str, metrics: dict[str, float]) -> str:
    """Moves `alias` of registered model `name` to `version` when its run's evaluation beats the
    holder's; returns the decision in words (also tagged on `version` as `promotion`)."""
    chosen = promotion_metric(metrics)
    holder = _holder(client, name, alias)
    moved = False
    if chosen is None:
        decision = (
            f"{alias} not moved: version {version} has no evaluation ({', '.join(k for k, _ in PROMOTION_METRICS)})"
        )
    elif holder is None:
        moved, decision = (
            True,
            f"{alias} -> version {version}, the first evaluated ({chosen[0]} {metrics[chosen[0]]:.4g})",
        )
    elif str(holder.version) == str(version):  # MLflow gives versions as int or str, by store
        decision = f"{alias} already on version {version}"
    else:
        key, better = chosen
        held = client.get_run(holder.run_id).data.metrics.get(key) if holder.run_id else None
        new = metrics[key]
        if held is None:
            moved, decision = (
                True,
                f"{alias} -> version {version}: {key} {new:.4g}; version {holder.version} has no {key}",
            )
        elif (new > held) if better == "higher" else (new < held):
            moved, decision = (
                True,
                f"{alias} -> version {version}: {key} {new:.4g} beats version {holder.version}'s {held:.4g}",
            )
        else:
            decision = (
                f"{alias} stays on version {holder.version}: version {version}'s {key} {new:.4g} does not "
                f"beat its {held:.4g} ({better} is better)"
            )
    if moved:
        client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, "promotion", decision)
    return decision


def _holder(client, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except Exception:  # noqa: BLE001 - MLflow raises RESOURCE_DOES_NOT_EXIST as a generic exception
        return None
