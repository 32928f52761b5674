"""Process trees carried across a warm swap: CRIU checkpoints on the data volume.

A warm swap used to stop the application and start it again on the new OS: whatever it held only in
memory was lost, and its start-up was part of the downtime. With a carry (``Customization.carry``,
the image's demo application by default) the swap instead:

1. in the quiesce, before anything is stopped: lists the files the tree maps and executes (size and
   modification time: what CRIU itself checks) and the content hash of the files named in the spec,
   then ``criu dump --leave-stopped`` writes the tree's images to ``<data>/.osimg-carry/<swap>/<tree>``.
   The tree stays on the old OS, stopped, and the quiesce leaves it stopped (its freeze/thaw skips it);
   so the old OS's page-out holds the very processes, and a rollback only has to continue them;
2. on the new OS, after the data volume is mounted and before anything else touches it (init scripts,
   the application's start): compares the listed files with the new OS's; if one differs the tree is
   *restarted* (the image's start, as before the carry existed) and the result says which file;
   otherwise ``criu restore`` brings the tree back, *resumed*, with its memory, its PIDs (it runs as
   PID 1 of its own PID namespace, so they cannot collide with the new OS's) and its listening
   sockets. A restore that fails fails the swap: it rolls back;
3. on a rollback: continues the stopped originals, or, if they are gone (killed because they held the
   data volume, or a crash rebooted the old OS), restores them from the checkpoint, or restarts them.

What the path cannot keep is not promised: TCP connections that were open at the checkpoint are
restored closed (``--tcp-close``): user-mode networking's connection state lives in the QEMU process
that the page-in replaces. The tiny image family has no CRIU: its trees are restarted, as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..customize import Carry, sh_quote
from ..errors import OsimgError
from ..host import qemu_img

CARRY_DIR = ".osimg-carry"  # under the data volume's mount point
RUN_DIR = "/run/osimg-carry"  # on the old OS: which PIDs the checkpoint left stopped (for a rollback)
NO_CRIU = "criu is not installed in the guest"
RESUMED = "resumed"
RESTARTED = "restarted"
# CRIU's options for every dump and restore: open TCP connections end with the QEMU process that
# carried them (user-mode networking), so they are saved and restored closed; queued, not yet
# accepted connections are skipped; file locks (flock/fcntl) are kept.
CRIU_OPTS = "--tcp-close --skip-in-flight --file-locks"
# The restored tree stays in the cgroup of whoever restored it (the guest agent's service): CRIU's
# own cgroup restore would recreate the old OS's paths behind systemd's back. osimg's commit moves
# it into a scope of its own afterwards (``adopt_script``), outside the downtime.
RESTORE_OPTS = f"{CRIU_OPTS} --manage-cgroups=ignore --restore-detached"


@dataclass
class TreeResult:
    """What became of one carried process tree in a swap (``SwapResult.processes``)."""

    name: str
    outcome: str  # resumed | restarted
    reason: str | None = None  # why it was restarted
    checkpoint_kib: int | None = None
    dump_seconds: float | None = None
    restore_seconds: float | None = None


# Shared shell functions (POSIX sh + GNU userland: only guests with CRIU run them).
FUNCS = r"""
now_ms() { read -r up _ </proc/uptime; echo "${up%.*}${up#*.}0"; }
tree_pids() { # $1 and its descendants
  echo "$1"; for t in /proc/$1/task/*/children; do for c in $(cat "$t" 2>/dev/null); do tree_pids "$c"; done; done
}
tree_pid() { # NAME PIDFILE UNIT: the tree's root PID, or nothing
  if [ -n "$3" ]; then P=$(systemctl show -p MainPID --value "$3" 2>/dev/null); else P=$(cat "$2" 2>/dev/null); fi
  case $P in ''|0|*[!0-9]*) return;; esac
  kill -0 "$P" 2>/dev/null && echo "$P"
}
fingerprint() { # DIR: the files the tree runs, as they are on this OS (size and mtime of what it maps
  # and executes, as CRIU checks them; content of the listed files), in as few processes as possible
  xargs -r -d '\n' -a "$1/mapped" stat -L -c '%s %Y %n' 2>&1; xargs -r -d '\n' -a "$1/listed" sha256sum 2>&1
}
"""


def _args(t: Carry) -> str:
    return " ".join([sh_quote(t.name), sh_quote(t.pidfile or ""), sh_quote(t.unit or ""), sh_quote(t.pause or ""),
                     *(sh_quote(f) for f in t.files)])


def prepare_script(trees: list[Carry], mount: str, token: str) -> str:
    """Before the downtime, on the old OS: which trees can be carried, and their files' fingerprint.

    Prints ``carry NAME ready`` or ``carry NAME restarted REASON`` per tree. Removes what an earlier,
    interrupted swap left in the checkpoint folder."""
    if not trees:
        return ""
    body = rf"""
CK={sh_quote(mount)}/{CARRY_DIR}
rm -rf "$CK" {RUN_DIR}; mkdir -p "$CK/{token}" {RUN_DIR}
carry_prepare() {{ # NAME PIDFILE UNIT PAUSE FILES...
  n=$1; P=$(tree_pid "$1" "$2" "$3"); shift 4
  [ -n "$P" ] || {{ echo "carry $n restarted it was not running"; return; }}
  # restored with its PIDs on an OS whose own processes may use them: only a namespace of its own is safe
  case $(grep '^NSpid:' "/proc/$P/status") in
    *[[:space:]]1) ;;
    *) echo "carry $n restarted it is not PID 1 of its own PID namespace (start it with unshare --pid --fork)"
       return;;
  esac
  d=$CK/{token}/$n; mkdir -p "$d"
  for p in $(tree_pids "$P"); do readlink "/proc/$p/exe"
    awk 'NF >= 6 && $6 ~ /^\// {{ s = $6; for (i = 7; i <= NF; i++) s = s " " $i; print s }}' "/proc/$p/maps"
  done 2>/dev/null | grep -v -e ' (deleted)$' -e "^$CK/" -e "^$M/" | sort -u >"$d/mapped"
  printf '%s\n' "$@" | grep . >"$d/listed"
  fingerprint "$d" >"$d/files"
  sed "s|^|fp $n |" "$d/files"
  echo "carry $n ready"
}}
"""
    calls = "".join(f"carry_prepare {_args(t)}\n" for t in trees)
    missing = "".join(f"echo {sh_quote(f'carry {t.name} restarted {NO_CRIU}')}\n" for t in trees)
    return (f"M={sh_quote(mount)}\nif command -v criu >/dev/null 2>&1; then\n{FUNCS}{body}{calls}"
            f"else\n{missing}fi\n")


def fingerprints(out: str) -> dict[str, list[str]]:
    """The files' fingerprint lines ``prepare_script`` printed (``fp NAME LINE``), by tree."""
    trees: dict[str, list[str]] = {}
    for line in out.splitlines():
        tag, _, rest = line.partition(" ")
        name, _, fp = rest.partition(" ")
        if tag == "fp" and name and fp:
            trees.setdefault(name, []).append(fp)
    return trees


MAX_FINGERPRINT = 512  # files the host reads in the target image for one tree (a Python server maps ~20)
HASH_LINE = re.compile(r"^([0-9a-f]{64})  (/.*)$")
STAT_LINE = re.compile(r"^(\d+) (\d+) (/.*)$")


def paths(lines: list[str]) -> list[str]:
    """The files a tree's fingerprint lines name (at most ``MAX_FINGERPRINT``)."""
    out = [m.group(m.lastindex or 0) for m in (STAT_LINE.match(x) or HASH_LINE.match(x) for x in lines) if m]
    return out[:MAX_FINGERPRINT]


def target_differs(disk: Path, lines: list[str]) -> tuple[bool, str | None]:
    """Before the downtime: the first file of a tree's fingerprint (taken on the running OS) that is
    different in the target image's disk, read from the host (None when all that can be judged from
    here matches), and whether every file could be judged here. CRIU refuses to restore over changed
    files, and a changed script would resume the old code on the new OS: such a tree is restarted,
    and then it is not checkpointed at all. A tree judged whole here is not checked again in the
    window (``restore_script``): the new OS runs exactly the target image's files."""
    if not lines or len(lines) > MAX_FINGERPRINT:
        return False, None  # the guest's word on what to read: a tree of thousands of files is judged in the guest
    stat_paths = [m[3] for m in map(STAT_LINE.match, lines) if m]
    hash_paths = [m[2] for m in map(HASH_LINE.match, lines) if m]
    try:
        there = qemu_img.files_in_image(disk, stat_paths, hash_paths)
    except OsimgError:
        return False, None  # no view of the image here (no FUSE): the new OS checks at restore time
    whole = True
    for line in lines:
        key = f"stat {m[3]}" if (m := STAT_LINE.match(line)) else f"hash {h[2]}" if (h := HASH_LINE.match(line)) \
            else None
        if key is None or key not in there:
            whole = False
        elif there[key] != line:
            return True, key.partition(" ")[2]
    return whole, None


def dump_script(trees: list[Carry], mount: str, token: str) -> str:
    """The quiesce's first part (in the downtime): checkpoint each prepared tree to the data volume
    and leave it stopped. Adds the stopped PIDs to ``carried`` (the quiesce's freeze and thaw must not
    touch them) and prints ``carry NAME dumped KIB MS`` or ``carry NAME restarted REASON`` per tree."""
    if not trees:
        return ""
    body = rf"""
CK={sh_quote(mount)}/{CARRY_DIR}
carry_dump() {{ # NAME PIDFILE UNIT PAUSE FILES...
  n=$1 pause=$4; P=$(tree_pid "$1" "$2" "$3")
  [ -n "$P" ] || {{ echo "carry $n restarted it stopped before the checkpoint"; return; }}
  d=$CK/{token}/$n
  [ -n "$pause" ] && {{ sh -c "$pause" </dev/null >/dev/null 2>&1 || echo "pause of $n failed: $?" >&2; }}
  ps=$(tree_pids "$P" | tr '\n' ' ')
  t=$(now_ms)
  if criu dump -t "$P" -D "$d" -o dump.log {CRIU_OPTS} --leave-stopped; then
    echo "$ps" >"{RUN_DIR}/$n"; echo "$P" >"$d/dumped"
    carried="$carried$ps "
    echo "carry $n dumped $(du -sk "$d" | cut -f1) $(( $(now_ms) - t ))"
  else
    echo "carry $n restarted the checkpoint failed: $(grep -i error "$d/dump.log" | head -1 | cut -c1-160)"
    rm -rf "$d"
  fi
}}
"""
    calls = "".join(f"carry_dump {_args(t)}\n" for t in trees)
    return FUNCS + body + calls


def restore_script(trees: list[Carry], mount: str, token: str, judged: set[str] | None = None) -> str:
    """For the new OS's live customization, right after its mounts: bring each checkpointed tree back.

    Prints ``carry NAME resumed MS`` or ``carry NAME restarted REASON``; exits 3 when CRIU cannot
    restore a tree whose files all match (the swap then rolls back). The files of a tree in
    ``judged`` were all compared in the target image before the window (``target_differs``): not
    again here (under TCG each program a Debian guest starts costs ~0.1 s of downtime)."""
    if not trees:
        return ""
    body = rf"""
CK={sh_quote(mount)}/{CARRY_DIR}/{token}
carry_restore() {{ # NAME PIDFILE UNIT PAUSE FILES...
  n=$1 pf=$2; d=$CK/$n
  [ -f "$d/dumped" ] || return 0
  if [ "$judged" != 1 ] && ! fingerprint "$d" | cmp -s - "$d/files"; then
    bad=$(fingerprint "$d" | diff - "$d/files" | sed -n 's/^> //p' | head -1 |
      awk '{{ if (length($1) == 64) $1 = ""; else {{ $1 = ""; $2 = "" }}; sub(/^ +/, ""); print }}')
    echo "carry $n restarted ${{bad:-a file it runs}} differs on the new OS"; return
  fi
  [ -n "$pf" ] || pf={RUN_DIR}-$n.pid
  rm -f "$pf"  # CRIU will not overwrite a PID file
  t=$(now_ms)
  if criu restore -D "$d" -o restore.log {RESTORE_OPTS} --pidfile "$pf"; then
    echo "carry $n resumed $(( $(now_ms) - t ))"
  else
    echo "CRIU could not restore $n: $(grep -i error "$d/restore.log" | head -1 | cut -c1-200)" >&2; exit 3
  fi
}}
"""
    calls = "".join(f"judged={int(t.name in (judged or set()))}; carry_restore {_args(t)}\n" for t in trees)
    return FUNCS + body + calls


def revive_script(trees: list[Carry], mount: str, token: str | None) -> str:
    """For a rollback's live script, after the old OS's mounts: continue the stopped trees, or restore
    them from the checkpoint when they are gone, then remove the checkpoints. Never fails: a tree that
    cannot come back is restarted by the image's start."""
    if not trees:
        return ""
    body = rf"""
CK={sh_quote(mount)}/{CARRY_DIR}
carry_revive() {{ # NAME PIDFILE UNIT PAUSE FILES...
  n=$1 pf=$2 unit=$3; d=$CK/{token or "none"}/$n
  ps=$(cat "{RUN_DIR}/$n" 2>/dev/null); set -- $ps
  if [ -n "$ps" ] && [ -d "/proc/$1" ] && grep -q '^State:.*(stopped)' "/proc/$1/status" 2>/dev/null; then
    kill -CONT $ps 2>/dev/null; echo "carry $n resumed 0"
  elif [ -f "$d/dumped" ] && [ -n "$(tree_pid "$n" "$pf" "$unit")" ]; then
    echo "carry $n restarted the old OS was booted again and started it"
  elif [ -f "$d/dumped" ]; then
    [ -n "$pf" ] || pf={RUN_DIR}-$n.pid
    rm -f "$pf"; t=$(now_ms)
    if criu restore -D "$d" -o restore-old.log {RESTORE_OPTS} --pidfile "$pf"; then
      echo "carry $n resumed $(( $(now_ms) - t ))"
    else echo "carry $n restarted CRIU could not restore it on the old OS either"; fi
  fi
  rm -f "{RUN_DIR}/$n"
}}
"""
    calls = "".join(f"carry_revive {_args(t)}\n" for t in trees)
    return FUNCS + body + calls + 'rm -rf "$CK"\n'


def cleanup_script(trees: list[Carry], mount: str) -> str:
    """After a commit, outside the downtime: move each resumed tree into a systemd scope of its own
    (``osimg-carry-NAME.scope``: stoppable with systemctl, not killed with the guest agent's service),
    then remove the checkpoints, which are no longer needed."""
    adopt = "".join(f"carry_adopt {sh_quote(t.name)} {sh_quote(t.pidfile or f'{RUN_DIR}-{t.name}.pid')}\n"
                    for t in trees)
    return FUNCS + r"""
carry_adopt() { # NAME PIDFILE
  P=$(cat "$2" 2>/dev/null) || return 0; kill -0 "$P" 2>/dev/null || return 0
  command -v busctl >/dev/null || return 0
  n=$1; ps=$(tree_pids "$P"); set -- $(echo "$ps" | wc -l) $ps
  busctl call org.freedesktop.systemd1 /org/freedesktop/systemd1 org.freedesktop.systemd1.Manager \
    StartTransientUnit 'ssa(sv)a(sa(sv))' "osimg-carry-$n.scope" fail 2 PIDs au "$@" \
    CollectMode s inactive-or-failed 0 >/dev/null 2>&1 || echo "could not move $n into a scope" >&2
}
""" + adopt + f"rm -rf {sh_quote(mount)}/{CARRY_DIR} {RUN_DIR}\n"


LINE = re.compile(r"^carry (\S+) (dumped|resumed|restarted)(?: (.*))?$")
READY = re.compile(r"^carry (\S+) ready$", re.M)


def ready(out: str) -> set[str]:
    """The trees ``prepare_script`` found ready for a checkpoint."""
    return set(READY.findall(out))


def parse(out: str, results: dict[str, TreeResult]) -> None:
    """Fold a script's ``carry ...`` lines into ``results`` (by tree name)."""
    for line in out.splitlines():
        m = LINE.match(line.strip())
        if m is None:
            continue
        name, what, rest = m.group(1), m.group(2), (m.group(3) or "")
        r = results.setdefault(name, TreeResult(name=name[:40], outcome=RESTARTED))
        if what == "dumped":
            kib, _, ms = rest.partition(" ")
            r.checkpoint_kib = _int(kib)
            r.dump_seconds = _seconds(ms)
        elif what == "resumed":
            r.outcome, r.reason = RESUMED, None
            r.restore_seconds = _seconds(rest)
        else:
            r.outcome, r.reason = RESTARTED, rest[:200]


def _int(s: str) -> int | None:
    return int(s) if s.isdigit() else None


def _seconds(ms: str) -> float | None:
    return round(int(ms) / 1000, 3) if ms.strip().isdigit() else None
