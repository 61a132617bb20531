"""Read-time data health: skipped samples counted per reason and shard, and a stop when the
skip rate passes the configured threshold, naming the shard that contributed most."""

from __future__ import annotations

import logging
from collections import Counter

from data_shards.errors import ValleyForgeError

log = logging.getLogger(__name__)


class TooManySkipped(ValleyForgeError):
    """The share of skipped samples passed data.max_skip_fraction (the data needs mending)."""

    exit_code = 1


class ReadHealth:
    """Samples seen and skipped (by reason, by shard): a reader slot's since its last batch, a
    step's across ranks, or a stage's, which `check` judges against the threshold."""

    def __init__(self, max_skip_fraction: float = 1.0, min_samples: int = 0):
        self.max_skip_fraction, self.min_samples = max_skip_fraction, min_samples
        self.seen = 0
        self.by_reason: Counter = Counter()
        self.by_shard: Counter = Counter()  # (url, reason) -> count

    def add(self, seen: int, by_reason: dict, by_shard: dict) -> None:
        self.seen += seen
        self.by_reason.update(by_reason)
        self.by_shard.update(by_shard)

    def add_batch(self, batch: dict) -> None:
        self.add(batch["seen"], batch["rejected"], batch["rejected_by_shard"])

    def reject(self, reason: str, url: str, detail: str) -> None:
        self.add(0, {reason: 1}, {(url, reason): 1})
        log.warning("skipped sample %s: %s (%s)", url, reason, detail)

    def drain(self) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
        """The skips counted so far, counting anew from here."""
        drained = dict(self.by_reason), dict(self.by_shard)
        self.by_reason, self.by_shard = Counter(), Counter()
        return drained

    @property
    def skipped(self) -> int:
        return sum(self.by_reason.values())

    def metrics(self) -> dict[str, float]:
        metrics = {f"data/rejected/{reason.replace(' ', '_')}": n for reason, n in self.by_reason.items()}
        metrics["data/skip_fraction"] = self.skipped / self.seen if self.seen else 0.0
        return metrics

    def check(self) -> None:
        if self.seen < self.min_samples or self.skipped <= self.max_skip_fraction * self.seen:
            return
        per_shard: Counter = Counter()
        for (url, _), n in self.by_shard.items():
            per_shard[url] += n
        worst = per_shard.most_common(1)[0][0]
        reasons = ", ".join(f"{n} {reason}" for (url, reason), n in sorted(self.by_shard.items()) if url == worst)
        raise TooManySkipped(
            f"{self.skipped} of {self.seen} samples read were skipped ({self.skipped / self.seen:.1%}), more than "
            f"data.max_skip_fraction {self.max_skip_fraction:.1%}; most in shard {worst} ({reasons}); "
            f"run `valleyforge shards verify` on the data"
        )

    def state_dict(self) -> dict:
        return {
            "seen": self.seen,
            "by_reason": dict(self.by_reason),
            "by_shard": [[url, reason, n] for (url, reason), n in self.by_shard.items()],
        }

    def load_state_dict(self, state: dict) -> None:
        self.seen, self.by_reason = state["seen"], Counter(state["by_reason"])
        self.by_shard = Counter({(url, reason): n for url, reason, n in state["by_shard"]})
