"""Property-based tests (hypothesis) of everything a user types: fleet specs, build steps, CLI arguments.

Each generator builds an input from parts that are each either valid or invalid, and remembers
whether it used an invalid one: the property is then "refused with one ValidationError line if and
only if some part was invalid", so neither a traceback nor a silent success on bad input passes.
The CLI runs in-process on libvirt's test:///default driver; no QEMU, the whole file in seconds.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator import cli
from orchestrator.errors import OsimgError, ValidationError
from orchestrator.fleet import spec as fleetspec
from orchestrator.images.lifecycle import BuildSteps

# bounded: the whole file stays well under the 60 s the issue allows in CI
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Part = tuple[bool, Any]  # (valid?, value)
Parts = tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]  # (valid values, invalid values)
OMIT = object()  # the key is left out (valid: every optional key has a default)
UNKNOWN_KEY = "unknown key"


def part(valid: st.SearchStrategy[Any], invalid: st.SearchStrategy[Any]) -> st.SearchStrategy[Part]:
    return st.one_of(valid.map(lambda v: (True, v)), invalid.map(lambda v: (False, v)))


def bad_one(parts: dict[str, Parts], places: int) -> st.SearchStrategy[tuple[int, str] | None]:
    """Which single part of an input is made invalid (None: all valid). One at a time, so every check
    is exercised on its own and a missing check shows up as a silent success."""
    return st.one_of(st.none(), st.tuples(st.integers(0, places - 1), st.sampled_from([*parts, UNKNOWN_KEY])))


junk = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), st.lists(st.integers(), max_size=2),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
# where a scalar is expected, a map or a list (the "network given as a map") comes first
shapes = st.sampled_from([{"x": 1}, ["a"], [], {}, True])
junk_nonnull = st.one_of(shapes, junk.filter(lambda v: v is not None))
bad_text = st.sampled_from(["", " ", "inf", "1e999", "-1G", "0", "abc", "1.5.5G", "x" * 5000, "\u2028", "\uff11G"])

SIZES_OK = st.sampled_from(["64M", "1G", "100", 512, "8M", "2g", "1.5G", "16384K"])
MEMORY_OK = st.sampled_from(["256M", 512, "1G", "64M", 100])
GUEST_PARTS: dict[str, Parts] = {
    "image": (st.sampled_from(["tiny:v1", "debian:v2", "golden", "img-1.2"]),
                  st.one_of(st.sampled_from(["", "nosuch:v1", "a/b", "..", "x" * 100]), junk)),
    "memory": (st.one_of(st.just(OMIT), MEMORY_OK),
                   st.one_of(bad_text, st.sampled_from([10, -1, 0, "63M", "65G"]), junk_nonnull)),
    "vcpus": (st.one_of(st.just(OMIT), st.integers(1, 64)),
                  st.one_of(st.integers(max_value=0), st.integers(min_value=65), st.sampled_from(["2", 1.5, True]),
                            junk_nonnull)),
    "data": (st.one_of(st.just(OMIT), SIZES_OK, SIZES_OK.map(lambda s: {"size": s, "mount": "/srv"})),
                 st.one_of(bad_text, st.sampled_from(["4k", -5, {"size": "1G", "x": 1}, {"mount": "/d"}]),
                           junk_nonnull)),
    "network": (st.sampled_from([OMIT, "user"]),
                    st.one_of(st.sampled_from(["nosuch", ""]), junk_nonnull)),
    "quiesce": (st.one_of(st.just(OMIT), st.fixed_dictionaries(
                        {}, optional={"stop": st.sampled_from(["systemctl stop db", "pkill -STOP w"]),
                                      "start": st.just("/etc/init.d/db start"),
                                      "grace": st.sampled_from(["10s", "500ms", "2m", 5, 0])})),
                    st.one_of(st.sampled_from([[1], {"grace": "forever"}, {"grace": -1}, {"grace": "11m"},
                                               {"stop": ""}, {"foo": 1}, {"stop": 5}]), bad_text)),
}


def fill(draw: st.DrawFn, parts: dict[str, Parts], bad: str | None, out: dict[str, Any]) -> dict[str, Any]:
    for key, (valid, invalid) in parts.items():
        value = draw(invalid if key == bad else valid)
        if value is not OMIT:
            out[key] = value
    if bad == UNKNOWN_KEY:
        out[draw(st.sampled_from(["nmae", "cpus", "disk", "quiesce_grace", "owner", "mode "]))] = 1
    return out


@st.composite
def fleet_spec(draw: st.DrawFn) -> tuple[bool, dict[str, Any]]:
    n = draw(st.integers(1, 4))
    bad = draw(bad_one(GUEST_PARTS, n))
    guests = [fill(draw, GUEST_PARTS, bad[1] if bad and bad[0] == i else None,
                   {"name": f"{draw(st.from_regex(r'[a-z][a-z0-9]{0,8}', fullmatch=True))}-{i}"})
              for i in range(n)]
    return bad is None, {"name": "f", "guests": guests}


def _write(data: Any, raw: bool = False) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        p = d / "in.yaml"
        p.write_text(data if raw else yaml.safe_dump(data, allow_unicode=True))
        return p
    return make


def _refused_in_one_line(fn: Callable[[], object]) -> bool:
    """True when ``fn`` refused with a ValidationError of one short line; False when it accepted.
    Anything else (another exception, a traceback) fails the test."""
    try:
        fn()
    except ValidationError as err:
        msg = str(err)
        assert "\n" not in msg and len(msg) < 1000, msg[:300]
        return True
    return False


@FAST
@given(fleet_spec())
def test_fleet_spec_is_refused_exactly_when_a_part_is_invalid(case: tuple[bool, dict[str, Any]]) -> None:
    ok, data = case
    with tempfile.TemporaryDirectory() as d:
        path = _write(data)(Path(d))
        refused = _refused_in_one_line(lambda: fleetspec.load(path))
    assert refused != ok, f"{'refused' if refused else 'accepted'}: {data!r}"[:2000]


@FAST
@given(st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20)),
                    lambda kids: st.one_of(st.lists(kids, max_size=4),
                                           st.dictionaries(st.sampled_from(list(fleetspec.TOP_KEYS) + list(
                                               fleetspec.GUEST_KEYS) + ["size", "mount", "x"]), kids, max_size=5)),
                    max_leaves=30))
def test_any_yaml_document_as_a_fleet_spec_never_raises_anything_but_a_one_line_error(data: Any) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = _write(data)(Path(d))
        with contextlib.suppress(ValidationError):
            spec = fleetspec.load(path)
            for g in spec.guests:  # what got through is in range
                assert 1 <= g.vcpus <= 64 and (g.memory_mib is None or 64 <= g.memory_mib <= 65536)


FILE_PARTS: dict[str, Parts] = {
    "path": (st.sampled_from(["/etc/motd", "/usr/local/bin/x", "/a b/c"]),
                 st.one_of(st.sampled_from(["etc/motd", "/a/../b", "", "\x00"]), junk)),
    "content": (st.one_of(st.just(OMIT), st.text(max_size=50)), junk_nonnull),
    "mode": (st.one_of(st.just(OMIT), st.sampled_from(["0644", "0755", "644", "4755"])),
                 st.one_of(st.sampled_from([644, 420, 493, "999", "12345", "rw-r--r--", "0o644"]), junk)),
}


COMMANDS: Parts = (st.lists(st.sampled_from(["apt-get update", "echo hi >/etc/x"]), max_size=3),
                   st.one_of(st.just("echo hi"), st.lists(st.sampled_from(["", 5, None]), min_size=1)))


@st.composite
def build_steps(draw: st.DrawFn) -> tuple[bool, dict[str, Any]]:
    n = draw(st.integers(1, 3))
    bad = draw(st.one_of(bad_one(FILE_PARTS, n), st.just((-1, "commands"))))
    files = [fill(draw, FILE_PARTS, bad[1] if bad and bad[0] == i else None, {}) for i in range(n)]
    cmds = draw(COMMANDS[1] if bad == (-1, "commands") else COMMANDS[0])
    return bad is None, {"files": files, "commands": cmds}


@FAST
@given(build_steps())
def test_build_steps_are_refused_exactly_when_a_part_is_invalid(case: tuple[bool, dict[str, Any]]) -> None:
    ok, data = case
    with tempfile.TemporaryDirectory() as d:
        path = _write(data)(Path(d))
        refused = _refused_in_one_line(lambda: BuildSteps.load(path))
    assert refused != ok, f"{'refused' if refused else 'accepted'}: {data!r}"[:2000]


# -- the CLI -------------------------------------------------------------------------------------------------
def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """The real entry point, in-process, on a private home and libvirt's test driver."""
    out, err = io.StringIO(), io.StringIO()
    with tempfile.TemporaryDirectory() as d, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(["--home", d, "--uri", "test:///default", *argv])
        except SystemExit as e:
            code = int(e.code or 0) if not isinstance(e.code, str) else 2
    return code, out.getvalue(), err.getvalue()


def check_cli(code: int, out: str, err: str) -> None:
    assert "Traceback" not in out + err
    assert code != 1, f"an unexpected error (a bug): {err}"
    assert code in (0, *range(2, 10)), (code, err)
    if code != 0:
        assert len(err.strip().splitlines()) == 1, err


CREATE_PARTS: dict[str, st.SearchStrategy[Part]] = {
    "--vcpus": part(st.integers(1, 64).map(str), st.one_of(
        st.integers(max_value=0).map(str), st.integers(min_value=65).map(str), st.sampled_from(["x", "1.5", ""]))),
    "--memory": part(st.integers(64, 65536).map(str), st.one_of(
        st.integers(max_value=63).map(str), st.integers(min_value=65537).map(str), st.sampled_from(["1G", ""]))),
    "--data-size": part(SIZES_OK.map(str), bad_text),
    "--quiesce-grace": part(st.sampled_from(["10s", "0", "500ms", "10m"]), st.one_of(
        st.sampled_from(["forever", "-1s", "11m", "1e9", ""]), st.text(max_size=10).filter(
            lambda t: not t.strip().replace(".", "", 1).isdigit()))),
}


@FAST
@given(st.fixed_dictionaries({k: st.one_of(st.none(), v) for k, v in CREATE_PARTS.items()}))
def test_guest_create_arguments(parts: dict[str, Part | None]) -> None:
    """Bad numbers exit 2 before anything happens; good ones reach the image lookup (unknown: 3)."""
    argv = ["guest", "create", "g", "--image", "nosuch-image"]
    ok = True
    for opt, p in parts.items():
        if p is not None:
            ok &= p[0]
            argv.append(f"{opt}={p[1]}")
    code, out, err = run_cli(argv)
    check_cli(code, out, err)
    assert code == (3 if ok else 2), (argv, code, err)


@FAST
@given(batch=part(st.integers(1, 64).map(str), st.one_of(st.integers(max_value=0).map(str),
                                                         st.integers(min_value=65).map(str), bad_text)),
       failures=part(st.integers(1, 1000).map(str), st.one_of(st.integers(max_value=0).map(str), bad_text)),
       strategy=part(st.sampled_from(["warm", "cold"]), st.sampled_from(["hot", "", "WARM"])))
def test_swap_arguments(batch: Part, failures: Part, strategy: Part) -> None:
    argv = ["swap", "g", "--to", "nosuch-image", f"--batch={batch[1]}", f"--max-failures={failures[1]}",
            f"--strategy={strategy[1]}", "--dry-run"]
    code, out, err = run_cli(argv)
    check_cli(code, out, err)
    assert code == (3 if batch[0] and failures[0] and strategy[0] else 2), (argv, code, err)


VERBS = [["guest", "list"], ["guest", "rm"], ["guest", "ssh"], ["guest", "resize"], ["image", "list"],
         ["image", "rm"], ["image", "inspect"], ["image", "verify"], ["swap"], ["swap", "--resume"],
         ["fleet", "validate"], ["fleet", "status"], ["fleet", "down"], ["image", "clone"], ["image", "snapshot"],
         ["vios", "list"], ["vios", "stop"], ["vios", "lu", "add"], ["vios", "lu", "rm"], ["vios", "export"],
         ["vios", "unexport"], ["vios", "attach"], ["vios", "detach"], ["vios", "failover"], ["cluster", "status"]]
TOKENS = st.one_of(st.sampled_from(["--json", "--all", "--to", "--disk", "os", "data", "--size", "--batch",
                                    "--dry-run", "--resume", "--timeout", "-1", "0", "1e999", "..", "/", "x",
                                    "--role", "--node", "--via", "qmp", "--standby", "--readonly", "/dev/null"]),
                   st.text(max_size=30), st.text(min_size=100, max_size=300))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VERBS), st.lists(st.sampled_from(["x", "g1", "lu1", "n1", "/dev/null"]), max_size=3),
       st.lists(TOKENS, max_size=5))
def test_any_arguments_to_any_verb_end_in_one_line_or_success(verb: list[str], names: list[str],
                                                              rest: list[str]) -> None:
    code, out, err = run_cli([*verb, *names, *rest])
    check_cli(code, out, err)


def test_the_properties_can_fail() -> None:
    """The oracle is not vacuous: a known-bad spec is refused and a known-good one accepted."""
    with tempfile.TemporaryDirectory() as d:
        bad = _write({"guests": [{"name": "a", "image": "tiny:v1", "vcpus": 0}]})(Path(d))
        assert _refused_in_one_line(lambda: fleetspec.load(bad))
        good = _write({"guests": [{"name": "a", "image": "tiny:v1", "vcpus": 2}]})(Path(d))
        assert not _refused_in_one_line(lambda: fleetspec.load(good))
    assert issubclass(ValidationError, OsimgError)
