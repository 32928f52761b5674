#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: osimg developers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: image
short_description: Build, clone, snapshot and remove osimg golden images
version_added: 1.0.0
description:
  - Manages the osimg image repository on the libvirt host through the orchestrator's Python API.
  - With O(kind=build), boots a hidden builder guest from O(source) (a recipe C(FAMILY:VERSION) such as C(tiny:v1),
    or an image of the catalog), runs the optional build steps in it and captures its disk and memory state
    as image O(name). This is C(osimg image build).
  - With O(kind=clone), makes a full, independent copy of the catalog image O(source) (C(osimg image clone));
    with O(kind=snapshot), a metadata-only qcow2 overlay on it (C(osimg image snapshot)).
  - Images are immutable. An image O(name) that already exists is left as it is and the task reports no change
    when it was made the same way (same O(kind), same O(source)); when it was made another way the task fails
    rather than replace it. Build steps are not compared.
  - With O(state=absent), removes the image (C(osimg image rm)). This is refused, with the command's message,
    while guests or other images depend on it.
options:
  name:
    description:
      - The image's name in the catalog (letters, digits, C(.), C(_) and C(-)).
    type: str
    required: true
  state:
    description:
      - V(present) makes sure the image exists, V(absent) that it does not.
    type: str
    choices: [present, absent]
    default: present
  source:
    description:
      - What the image is made from. Required with O(state=present).
      - For O(kind=build), a recipe C(FAMILY:VERSION) or a catalog image; for O(kind=clone) and O(kind=snapshot),
        a catalog image.
    type: str
  kind:
    description:
      - How the image is made from O(source).
    type: str
    choices: [build, clone, snapshot]
    default: build
  steps:
    description:
      - Build steps run in the builder guest before capture (O(kind=build) only), as C(osimg image build
        --customize) reads them from a file.
      - C(files) is a list of mappings with C(path) (absolute), C(content) and C(mode) (octal, default C(0644));
        C(commands) is a list of shell commands.
    type: dict
  steps_file:
    description:
      - A YAML file on the managed host with the build steps (the format of O(steps)).
    type: path
  timeout:
    description:
      - Seconds the builder guest may take to boot.
    type: float
    default: 180
extends_documentation_fragment:
  - osimg.virt.common
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: Reports whether the image would be made or removed, after the same checks as a real run.
  diff_mode:
    support: none
  platform:
    platforms: posix
seealso:
  - module: osimg.virt.swap
author:
  - osimg developers (@osimg)
"""

EXAMPLES = r"""
- name: Capture a golden image from the tiny v2 recipe, with a marker file installed
  osimg.virt.image:
    name: app-v2
    source: tiny:v2
    steps:
      files:
        - path: /etc/app-release
          content: "2.0\n"
      commands:
        - sync
    home: /var/lib/osimg

- name: Full copy of it
  osimg.virt.image:
    name: app-v2-copy
    source: app-v2
    kind: clone

- name: Metadata-only image on top of it (a qcow2 overlay)
  osimg.virt.image:
    name: app-v2-snap
    source: app-v2
    kind: snapshot

- name: Remove an image nothing uses any more
  osimg.virt.image:
    name: app-v1
    state: absent
"""

RETURN = r"""
image:
  description:
    - The image's catalog record (what C(osimg image inspect --json) shows).
    - After O(state=absent), the record of the removed image.
    - In check mode, when the image would be made, only C(name), C(kind) and C(source).
  returned: when the image exists or existed
  type: dict
  contains:
    name:
      description: The image's name.
      type: str
      sample: app-v2
    kind:
      description: How it was made.
      type: str
      sample: built
    source:
      description: The recipe or image it was made from.
      type: str
      sample: tiny:v2
    parent:
      description: The catalog image it was made from, if any.
      type: str
      sample: null
    os_version:
      description: The OS version inside.
      type: str
      sample: v2
    has_memory_state:
      description: Whether a memory state was captured (needed for warm swaps).
      type: bool
      sample: true
    allocated_size:
      description: Bytes the image's files take on disk.
      type: int
      sample: 41943040
  sample:
    name: app-v2
    kind: built
    source: tiny:v2
    parent: null
    os_version: v2
    has_memory_state: true
"""

import os
import tempfile
from pathlib import Path
from typing import Any

from ansible_collections.osimg.virt.plugins.module_utils.common import new_module, plain, run

try:
    from orchestrator import recipes
    from orchestrator.images import catalog, lifecycle
    from orchestrator.errors import ConflictError, NotFoundError, ValidationError
    from orchestrator.validate import name as valid_name
except ImportError:
    pass  # new_module() fails the task with the import error

KINDS = {"build": "built", "clone": "clone", "snapshot": "snapshot"}


def build_steps(params: dict[str, Any]) -> lifecycle.BuildSteps | None:
    """Build steps from a file or from the task, checked by the same code the command uses."""
    if params["steps_file"]:
        return lifecycle.BuildSteps.load(Path(params["steps_file"]))
    if params["steps"] is None:
        return None
    import yaml  # a dependency of the orchestrator, so present wherever it is

    fd, tmp = tempfile.mkstemp(suffix=".yml")
    try:
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(params["steps"], f)
        try:
            return lifecycle.BuildSteps.load(Path(tmp))
        except ValidationError as err:
            raise ValidationError(str(err).replace(tmp, "option steps")) from None
    finally:
        os.unlink(tmp)


def present(module: Any, ctx: Any) -> dict[str, Any]:
    p = module.params
    name, source, kind = p["name"], p["source"], p["kind"]
    if kind != "build" and (p["steps"] is not None or p["steps_file"]):
        raise ValidationError(f"image {name}: build steps apply to kind=build only, not kind={kind}")
    try:
        existing = catalog.get(ctx, name)
    except NotFoundError:
        existing = None
    if existing is not None:
        if existing.kind != KINDS[kind] or existing.source != source:
            raise ConflictError(
                f"an image named {name!r} already exists ({existing.kind} from {existing.source}, not "
                f"{KINDS[kind]} from {source}); images are immutable: remove it first with "
                f"'osimg image rm {name}' (state=absent)")
        return {"changed": False, "image": plain(existing)}
    steps = build_steps(p) if kind == "build" else None
    if module.check_mode:
        valid_name(name, "image name")
        if kind == "build" and ":" in source:
            recipes.parse_ref(source)
        else:
            catalog.get(ctx, source)
        return {"changed": True, "image": {"name": name, "kind": KINDS[kind], "source": source}}
    if kind == "build":
        img = lifecycle.build(ctx, name, source, steps, boot_timeout=p["timeout"])
    elif kind == "clone":
        img = catalog.clone(ctx, source, name)
    else:
        img = catalog.snapshot(ctx, source, name)
    return {"changed": True, "image": plain(img)}


def absent(module: Any, ctx: Any) -> dict[str, Any]:
    name = module.params["name"]
    try:
        img = catalog.get(ctx, name)
    except NotFoundError:
        return {"changed": False}
    if module.check_mode:
        deps = lifecycle.dependents(ctx, name)
        if deps:
            # the message lifecycle.remove raises
            raise ConflictError(f"image {name!r} is in use by {', '.join(deps)}; remove those first")
    else:
        lifecycle.remove(ctx, name)
    return {"changed": True, "image": plain(img)}


def main() -> None:
    module = new_module(
        {
            "name": {"type": "str", "required": True},
            "state": {"type": "str", "default": "present", "choices": ["present", "absent"]},
            "source": {"type": "str"},
            "kind": {"type": "str", "default": "build", "choices": ["build", "clone", "snapshot"]},
            "steps": {"type": "dict"},
            "steps_file": {"type": "path"},
            "timeout": {"type": "float", "default": 180},
        },
        required_if=[("state", "present", ["source"])],
        mutually_exclusive=[("steps", "steps_file")],
    )
    run(module, lambda ctx: present(module, ctx) if module.params["state"] == "present" else absent(module, ctx))


if __name__ == "__main__":
    main()
