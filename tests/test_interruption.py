"""What a stage does at a step boundary on a stop request or a preemption notice, and how the
driver takes SIGTERM and SIGINT: the first asks for a stop, a second stops at once."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from trainer.interruption import MARGIN_S, RESTART_WAIT_S, UNSTATED_DEADLINE_S, InterruptionPolicy, Notice

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_stop_saves_the_step_and_ends_the_stage():
    action = InterruptionPolicy().decide(Notice(stop=True), step_s=1.0, save_s=2.0)
    assert (action.save, action.then) == (True, "stop")


def test_no_notice_trains_on():
    action = InterruptionPolicy().decide(Notice(), step_s=1.0, save_s=2.0)
    assert (action.save, action.then) == (False, "train")


def test_a_preemption_saves_at_once_trains_while_there_is_room_then_saves_and_waits():
    clock = Clock()
    policy = InterruptionPolicy(clock)
    notice = Notice(preempted_nodes=("a1b2c3d4e5f6",), deadline=clock.now + 60)
    first = policy.decide(notice, step_s=1.0, save_s=0.0)
    assert (first.save, first.then) == (True, "train") and "node a1b2c3d4 preempted in 60 s" in first.why
    clock.now += 10  # 50 s left: room for a 1 s step and a 4 s save
    again = policy.decide(notice, step_s=1.0, save_s=4.0)
    assert (again.save, again.then) == (False, "train")  # saved once for this node
    clock.now += 50 - (1.5 * 5 + MARGIN_S)  # exactly too little room left
    last = policy.decide(notice, step_s=1.0, save_s=4.0)
    assert (last.save, last.then, last.deadline) == (True, "wait", notice.deadline)
    assert "too soon for another step" in last.why


def test_a_second_node_preempted_later_is_saved_for_too():
    clock = Clock()
    policy = InterruptionPolicy(clock)
    policy.decide(Notice(preempted_nodes=("a",), deadline=clock.now + 100), 1.0, 1.0)
    both = policy.decide(Notice(preempted_nodes=("a", "b"), deadline=clock.now + 100), 1.0, 1.0)
    assert (both.save, both.then) == (True, "train")


def test_a_notice_without_deadline_gets_the_one_ray_assumes():
    clock = Clock()
    policy = InterruptionPolicy(clock)
    first = policy.decide(Notice(preempted_nodes=("a",)), 1.0, 1.0)
    assert (first.save, first.then) == (True, "train")
    clock.now += UNSTATED_DEADLINE_S - 5
    last = policy.decide(Notice(preempted_nodes=("a",)), 1.0, 1.0)
    assert (last.then, last.deadline) == ("wait", 1000.0 + UNSTATED_DEADLINE_S)


def test_ranks_that_were_not_restarted_long_after_the_deadline_train_on():
    clock = Clock()
    policy = InterruptionPolicy(clock)
    notice = Notice(preempted_nodes=("a",), deadline=clock.now + 5)
    assert policy.decide(notice, 1.0, 1.0).then == "wait"
    clock.now += 5 + RESTART_WAIT_S + 1  # the node stayed after all
    assert policy.decide(notice, 1.0, 1.0).then == "train"


# A driver stand-in: listens as `valleyforge run` does and reports what each signal did.
LISTENER = """
import signal, sys, time
from launch.stop_request import StopRequest
try:
    with StopRequest().listening() as stop:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # as ray.init does
        stop.listen()  # as the driver does after it
        print("listening", flush=True)
        while True:
            time.sleep(0.05)
            if stop.requested:
                print(f"requested {stop.signal}", flush=True)
                while True:
                    time.sleep(0.05)
except KeyboardInterrupt:
    print("stopped at once", flush=True)
    sys.exit(130)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_first_signal_asks_for_a_stop_and_a_second_stops_at_once(sig):
    driver = subprocess.Popen(
        [sys.executable, "-c", LISTENER],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a foreground command
    )
    assert driver.stdout.readline() == "listening\n"
    driver.send_signal(sig)
    assert driver.stdout.readline() == f"requested {int(sig)}\n"
    time.sleep(0.2)
    driver.send_signal(sig)
    out, err = driver.communicate(timeout=30)
    assert driver.returncode == 130 and out == "stopped at once\n", out + err
    assert f"valleyforge: {sig.name}: stopping after the step in progress, which is saved" in err
