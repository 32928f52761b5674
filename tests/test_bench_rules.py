"""The benchmarks' own rules, without guests: the probe/orchestrator agreement rule of issue 17, the
step durations read from ``SwapResult.steps``, and how the probe finds an outage between two OSes.
A benchmark that cannot say DISAGREE, or that reads an outage inside one OS, is not a measurement."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


load("homes")  # what the benchmarks import from their own folder
sd = load("swap_downtime")


def test_agreement_rule_is_the_interval_plus_a_fifth_of_the_larger_figure() -> None:
    # baseline run of issue 17: warm tiny, probe 2.186 s vs orchestrator 2.921 s: 0.735 > 0.05 + 0.584
    assert sd.agree(2.186, 2.921) == (False, 0.05 + 0.2 * 2.921)
    assert sd.agree(1.6, 1.7)[0]
    assert sd.agree(1.7, 1.6)[0]  # symmetric: the larger figure, whichever side it is on
    assert not sd.agree(0.1, 1.7)[0]  # the 20x under-report
    assert sd.agree(2.0, 2.6, every=0.25)[0] and not sd.agree(2.0, 2.6)[0]  # the interval counts
    ok, tol = sd.agree(float("nan"), 1.0)
    assert not ok and math.isnan(tol)  # no answer of the new OS: never agrees
    assert not sd.agree(1.0, None)[0]  # no orchestrator figure (a failed swap): never agrees


def test_step_durations_are_differences_of_the_cumulative_steps() -> None:
    steps = {"prepare": 0.277, "quiesce": 1.454, "page-out": 1.618, "page-in": 2.162}
    assert sd.step_durations(steps) == {"prepare": 0.277, "quiesce": 1.177, "page-out": 0.164, "page-in": 0.544}


def test_outage_lies_between_the_old_os_and_the_new_one() -> None:
    p = sd.Probe(1)
    # answers (answered, version, sent): a long gap inside v1 first, then the swap's outage
    p.ok = [(10.0, "v1", 9.95), (13.0, "v1", 12.95), (13.1, "v1", 13.05), (14.5, "v2", 14.45), (14.6, "v2", 14.55)]
    p.sends = [9.95, 12.95, 13.05, 13.1, 13.3, 14.45, 14.55]
    last_old, first_new, blind = p.outage("v1", "v2")
    assert (last_old, first_new) == (13.1, 14.5)  # 1.4 s, not the 3 s gap inside v1
    assert math.isclose(blind, 14.45 - 13.3)
    assert all(math.isnan(x) for x in p.outage("v1", "v3"))  # the new OS never answered
    # a slow first answer of a booting new OS counts when it came (it served by then); a slow one of
    # the old OS does not extend the old OS's time
    p.late = [(14.3, "v2", 13.6), (13.9, "v1", 13.2)]
    assert p.outage("v1", "v2")[:2] == (13.1, 14.3)
