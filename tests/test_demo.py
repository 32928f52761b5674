"""The README's main job, run the way a user runs it: every guest ends on v2, nothing is left behind."""

from __future__ import annotations

import json

import pytest

from orchestrator.context import Context
from orchestrator.demo import SPEC, leftovers
from orchestrator.fleet import spec as fleetspec

from .conftest import osimg

pytestmark = pytest.mark.guest


def test_demo_json_rolls_every_guest_to_v2_and_cleans_up(ctx: Context) -> None:
    res = osimg("demo", "--json", timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    rep = json.loads(res.stdout)
    print(f"\n[measure] demo phases: {rep['phases']}; downtimes: {[g['downtime'] for g in rep['guests']]}")
    assert rep["ok"] and len(rep["guests"]) == 3
    for g in rep["guests"]:
        assert (g["old_version"], g["new_version"]) == ("v1", "v2"), g
        assert g["counter_before"] >= 1 and g["counter_after"] >= g["counter_before"], g
        assert g["overlay_bytes"] < 64 << 20
    assert [i["name"] for i in rep["lineage"]] == ["demo-v1", "demo-v2"]
    assert rep["leftovers"] == []
    assert leftovers(ctx, fleetspec.load(SPEC)) == []
    assert rep["phases"]["total"] < 600
