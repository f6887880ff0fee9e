"""lowbit.comparison.timing: the timing phase's ratio logic against a fake clock (no real time measured)."""
import pytest

from lowbit.comparison import timing


class FakeClock:
    """Advances only when a fake step runs: step `label` costs cost[label] * slowdown(round) seconds of wall
    time and twice that of CPU time (two threads)."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def advance(self, dt):
        self.wall += dt
        self.cpu += 2 * dt


def fake_probe_factory(clock, cost, slowdown):
    calls = {"n": 0}

    class Probe:
        def __init__(self, cfg, dataset, device):
            self.label = cfg
            self.round = calls["n"] // len(cost)
            calls["n"] += 1

        def step(self):
            clock.advance(cost[self.label] * slowdown(self.round))

    return Probe


def run(cost, slowdown=lambda r: 1.0, rounds=3, steps=2, reference="bf16"):
    clock = FakeClock()
    probe = fake_probe_factory(clock, cost, slowdown)
    return timing.measure({k: k for k in cost}, None, reference, rounds=rounds, steps=steps,
                          clock=lambda: clock.wall, cpu_clock=lambda: clock.cpu, probe=probe)


def test_ratios_are_medians_over_interleaved_rounds():
    t = run({"bf16": 0.1, "fp8-tensor": 0.12, "fp4-paper": 0.3})
    per = t["per_recipe"]
    assert per["bf16"]["rel"] == pytest.approx(1.0)
    assert per["fp8-tensor"]["rel"] == pytest.approx(1.2) and per["fp4-paper"]["rel"] == pytest.approx(3.0)
    assert per["fp4-paper"]["step_s"] == pytest.approx(0.3) and per["fp4-paper"]["cpu_s"] == pytest.approx(0.6)
    assert t["rounds"] == 3 and t["steps"] == 2 and not [w for w in t["warnings"] if "disagree" in w]


def test_load_that_hits_every_recipe_alike_leaves_ratios_alone():
    """A machine twice as slow in round 2 slows every recipe of that round (they are interleaved): ratios keep,
    but the rounds disagree and the report says so."""
    t = run({"bf16": 0.1, "fp4-paper": 0.3}, slowdown=lambda r: 2.0 if r == 1 else 1.0)
    assert t["per_recipe"]["fp4-paper"]["rel"] == pytest.approx(3.0)
    assert t["per_recipe"]["bf16"]["spread"] == pytest.approx(2.0)
    assert any("disagree by more than 20%" in w and "bf16" in w for w in t["warnings"])


def test_own_threads_are_not_a_busy_machine():
    """Issue 21: on 2 cores lowbit's own 2 threads read load 2.1 and the report called the machine busy."""
    own = timing.summarize({"bf16": [[(0.1, 0.2)]]}, "bf16", 2.11, 2.09, 2, 1, 1, own_threads=2)
    assert not own["warnings"]
    other = timing.summarize({"bf16": [[(0.1, 0.2)]]}, "bf16", 2.1, 3.9, 2, 1, 1, own_threads=2)  # a second job
    assert any("machine was busy" in w for w in other["warnings"])
    wide = timing.summarize({"bf16": [[(0.1, 0.2)]]}, "bf16", 5.0, 5.0, 8, 1, 1, own_threads=2)  # free cores left
    assert not wide["warnings"]


def test_busy_machine_warning_from_load_average():
    t = timing.summarize({"bf16": [[(0.1, 0.2)]]}, "bf16", load_before=0.5, load_after=4.0, cores=2, rounds=1,
                         steps=1)
    assert any("machine was busy" in w for w in t["warnings"])
    quiet = timing.summarize({"bf16": [[(0.1, 0.2)]]}, "bf16", 0.5, 1.5, 2, 1, 1)
    assert quiet["warnings"] == []


def test_no_reference_no_ratio():
    t = timing.summarize({"fp32": [[(0.1, 0.1)]]}, None, 0.0, 0.0, 2, 1, 1)
    assert t["per_recipe"]["fp32"]["rel"] is None
