"""The osimg.virt modules' documentation against their argument specs, without Ansible running them.

``ansible-doc`` and the docs site show DOCUMENTATION; Ansible checks a task against the
argument spec. When the two drift apart (an option added to one only, another default or type), a
playbook written from the docs fails or silently gets something else. ``ansible-test sanity``
(validate-modules) catches that too, but needs its own environment; this runs with the fast tests.
Each module is imported as Ansible would import it, and its ``new_module`` call is stopped to read
the spec it passes.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from orchestrator.settings import SOURCE_ROOT

COLLECTIONS = SOURCE_ROOT / "ansible" / "collections"
MODULES = ("fleet", "guest", "image", "swap")
PKG = "ansible_collections.osimg.virt.plugins"


class Spec(Exception):
    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__("argument spec")
        self.spec = spec


@pytest.fixture(scope="module", autouse=True)
def collection_on_path() -> Iterator[None]:
    sys.path.insert(0, str(COLLECTIONS))
    try:
        yield
    finally:
        sys.path.remove(str(COLLECTIONS))


def argument_spec(module: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The spec ``main()`` gives ``new_module``, with the common options it adds."""
    mod = importlib.import_module(f"{PKG}.modules.{module}")
    common = importlib.import_module(f"{PKG}.module_utils.common")

    def stop(spec: dict[str, Any], **_: Any) -> None:
        raise Spec({**spec, **common.COMMON_ARGS})

    monkeypatch.setattr(mod, "new_module", stop)
    with pytest.raises(Spec) as got:
        mod.main()
    return got.value.spec


def documented(module: str) -> dict[str, Any]:
    mod = importlib.import_module(f"{PKG}.modules.{module}")
    frag = importlib.import_module(f"{PKG}.doc_fragments.common").ModuleDocFragment
    doc = yaml.safe_load(mod.DOCUMENTATION)
    assert doc["extends_documentation_fragment"][0] == "osimg.virt.common"
    return {**doc["options"], **yaml.safe_load(frag.DOCUMENTATION)["options"]}


def compare(where: str, doc: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """Differences between documented options and an argument spec, recursively for suboptions."""
    out = []
    for name in sorted(set(doc) | set(spec)):
        if name not in spec:
            out.append(f"{where}{name}: documented, not in the argument spec")
            continue
        if name not in doc:
            out.append(f"{where}{name}: in the argument spec, not documented")
            continue
        d, s = doc[name], spec[name]
        for key, default in (("type", "str"), ("default", None), ("choices", None), ("required", False),
                             ("aliases", None), ("elements", None)):
            if d.get(key, default) != s.get(key, default):
                out.append(f"{where}{name}: {key} is {d.get(key, default)!r} in the docs, "
                           f"{s.get(key, default)!r} in the argument spec")
        if "suboptions" in d or "options" in s:
            out += compare(f"{where}{name}.", d.get("suboptions", {}), s.get("options", {}))
        if not d.get("description"):
            out.append(f"{where}{name}: no description")
    return out


@pytest.mark.parametrize("module", MODULES)
def test_documentation_matches_the_argument_spec(module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert compare("", documented(module), argument_spec(module, monkeypatch)) == []


@pytest.mark.parametrize("module", MODULES)
def test_examples_and_return_values_are_yaml(module: str) -> None:
    mod = importlib.import_module(f"{PKG}.modules.{module}")
    tasks = yaml.safe_load(mod.EXAMPLES)
    assert tasks and all(isinstance(t, dict) and "name" in t for t in tasks)
    spec_names = set(documented(module))
    for t in tasks:  # every option an example of this module gives is one the module has
        given = t.get(f"osimg.virt.{module}")
        if isinstance(given, dict):
            assert set(given) <= spec_names, f"{t['name']}: {set(given) - spec_names}"
    assert isinstance(yaml.safe_load(mod.RETURN), dict)


def test_host_options_of_the_several_hosts_issue(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 18: a swap takes per_host (no limit by default) and a guest the host to create it on."""
    swap = argument_spec("swap", monkeypatch)
    assert swap["per_host"] == {"type": "int"}
    guest = argument_spec("guest", monkeypatch)
    assert guest["host"] == {"type": "str"}
    fleet = yaml.safe_load(importlib.import_module(f"{PKG}.modules.fleet").DOCUMENTATION)
    assert "hosts" in " ".join(fleet["description"]), "the fleet module does not say a spec may name hosts"
