"""What a stage does at a step boundary when its run is interrupted: the driver was asked to stop
(a signal, `valleyforge jobs stop`), or a node that holds ranks is being taken away with notice (a
spot reclaim or a pod eviction, which Ray reports as the drain of a node with a deadline).

A stop saves the step just trained and ends the stage there; the same command resumes it. A
preemption saves the step at once and trains on while the deadline leaves room for another step
and a save; at the last step that fits it saves again and waits for Ray Train to restart the
workers from that checkpoint, so that no step is trained twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Literal

# Seconds kept free before a deadline besides the time a step and a save are measured to take.
MARGIN_S = 5.0
# The deadline Ray Train assumes when a drain states none (its DEFAULT_PREEMPTION_DEADLINE_S,
# counted from its own notice, which comes a little before ours: hence a little less).
UNSTATED_DEADLINE_S = 110.0
# How long the ranks wait past a deadline to be restarted before they train on (Ray may have
# kept the node after all).
RESTART_WAIT_S = 60.0


@dataclass(frozen=True)
class Notice:
    """What the step boundary learned."""

    stop: bool = False  # the driver asks the stage to stop
    preempted_nodes: tuple[str, ...] = ()  # Ray node ids being drained for a preemption
    deadline: float | None = None  # the UNIX time they go away; None: not said


@dataclass(frozen=True)
class Action:
    save: bool = False  # a checkpoint of the step just trained
    then: Literal["train", "stop", "wait"] = "train"  # go on; end the stage; wait to be restarted
    why: str = ""
    deadline: float = 0.0  # with "wait": the preemption's (UNIX time)


class InterruptionPolicy:
    """Decides on rank 0 what a notice means, given how long the last step and save took."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.saved_for: set[str] = set()  # the preempted nodes a checkpoint was saved for
        self.first_notice: float | None = None  # when a preemption was first seen

    def decide(self, notice: Notice, step_s: float, save_s: float) -> Action:
        if notice.stop:
            return Action(save=True, then="stop", why="stop requested")
        if not notice.preempted_nodes:
            return Action()
        nodes = ", ".join(node[:8] for node in notice.preempted_nodes)
        new = not set(notice.preempted_nodes) <= self.saved_for
        self.saved_for |= set(notice.preempted_nodes)
        self.first_notice = self.first_notice or self.clock()
        deadline = notice.deadline or self.first_notice + UNSTATED_DEADLINE_S
        left = deadline - self.clock()
        if left < -RESTART_WAIT_S:  # long past, and the ranks were not restarted: the node stayed
            return Action()
        if left > 1.5 * (step_s + save_s) + MARGIN_S:
            return Action(save=new, then="train", why=f"node {nodes} preempted in {left:.0f} s")
        why = f"node {nodes} preempted in {left:.0f} s, too soon for another step"
        return Action(save=True, then="wait", why=why, deadline=deadline)


def wait_to_be_restarted(deadline: float) -> None:
    """Blocks while Ray Train tears the ranks down after the deadline; returns only when it has
    not by the deadline plus RESTART_WAIT_S (the node stayed after all), to train on."""
    until = deadline + RESTART_WAIT_S
    while time.time() < until:
        time.sleep(min(1.0, max(0.0, until - time.time())))
