# -*- coding: utf-8 -*-
# Copyright: osimg developers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

"""Plumbing the osimg.virt modules share: common options, the Context, errors as task failures.

The modules run on the libvirt host with the interpreter that has the ``orchestrator`` package
(the osimg virtualenv). Every expected failure is an ``OsimgError`` whose message is the one the
``osimg`` command prints; it becomes the task's ``msg`` unchanged.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from typing import Any

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

try:
    from orchestrator.context import Context
    from orchestrator.errors import OsimgError
    from orchestrator.validate import parse_size
except ImportError:
    HAS_ORCHESTRATOR = False
    ORCHESTRATOR_IMPORT_ERROR: str | None = traceback.format_exc()
else:
    HAS_ORCHESTRATOR = True
    ORCHESTRATOR_IMPORT_ERROR = None

COMMON_ARGS: dict[str, dict[str, Any]] = {
    "home": {"type": "path"},
    "uri": {"type": "str"},
    "store": {"type": "str"},
}

Result = dict[str, Any]


class TaskFailed(Exception):
    """A failure that still has results to report (per-guest swap results, what was changed)."""

    def __init__(self, msg: str, **result: Any) -> None:
        super().__init__(msg)
        self.msg = msg
        self.result = result


def new_module(argument_spec: dict[str, dict[str, Any]], **kwargs: Any) -> AnsibleModule:
    """An AnsibleModule with the common options and check mode; fails at once without the orchestrator."""
    module = AnsibleModule(argument_spec={**argument_spec, **COMMON_ARGS}, supports_check_mode=True, **kwargs)
    if not HAS_ORCHESTRATOR:
        module.fail_json(msg=missing_required_lib("osimg (the orchestrator package)"),
                         exception=ORCHESTRATOR_IMPORT_ERROR)
    return module


def run(module: AnsibleModule, body: Callable[[Context], Result]) -> None:
    """Call ``body(ctx)`` and exit with its result; an OsimgError fails the task with its own message."""
    ctx = None
    try:
        ctx = Context.from_env(home=module.params["home"], uri=module.params["uri"], store=module.params["store"])
        result = body(ctx)
    except TaskFailed as err:
        module.fail_json(msg=err.msg, **err.result)
    except OsimgError as err:
        module.fail_json(msg=str(err))
    else:
        module.exit_json(**result)
    finally:
        if ctx is not None:
            ctx.close()


def plain(obj: Any) -> Any:
    """A dataclass (or a list of them) as JSON-ready dicts for a task result."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    if isinstance(obj, list):
        return [plain(o) for o in obj]
    return obj


def size_bytes(value: Any, option: str) -> int:
    """``64M``, ``1.5G``, ``512K`` or a plain number of MiB (as in a fleet spec) in bytes: the CLI's rule."""
    return parse_size(value, option)
