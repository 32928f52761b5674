"""A workload the image does not know: a guest-side writer of synced records, and its host-side checker.

The writer appends numbered, checksummed lines (``N md5(osimg-record-N)[:8]``) to /data/records and
syncs the file after each one (busybox and coreutils ``sync FILE`` both fsync it); only after the
sync succeeds does it print ``OSIMG-W N N`` on the serial console, a channel outside /data that the
host keeps reading (``ConsoleWatch``) even when a swap deletes or truncates the log file. So every
number the console shows was on the data volume's disk at that moment, and ``check`` can demand it
afterwards.

The writer behaves like a careful real program, nothing more: a failed append or sync is retried,
and after any error it re-reads where the file ends (another instance, e.g. on the new OS of a
swap that then rolled back, may have written meanwhile) before it writes the next number. It writes
no record while /data is not its data volume (no records file there). It never gives up: keeping
on writing through the quiesce is the point.

Used by the swap tests (quiesce of a real workload, kill-at-every-failpoint): start it with
``start``, swap, then ``stop`` it and ``check(read_records(...), watch.synced)``.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator import guests
from orchestrator.context import Context
from orchestrator.customize import sh_quote
from orchestrator.swap.steps import guest_sh

RECORDS = "/data/records"
PIDFILE = "/run/osimg-writer.pid"
REPORT = re.compile(rb"OSIMG-W (\d+) (\d+)\b")

# POSIX sh (busybox ash, dash, bash). $1 records file, $2 seconds between records, $3 "hold" keeps
# the file open and the working directory on /data (a database-like holder the quiesce must kill).
PROGRAM = r"""
R=$1; PAUSE=$2; HOLD=$3; P=/run/osimg-writer.pid
echo $$ >$P
: >>"$R" 2>/dev/null
if [ "$HOLD" = hold ]; then cd "$(dirname "$R")" && exec 3>>"$R"; fi
sum() { printf 'osimg-record-%s' "$1" | md5sum | cut -c1-8; }
next() {  # the number after the file's last record; fails while there is no records file (not the data volume)
  [ -f "$R" ] || return 1
  last=$(tail -n 1 "$R" 2>/dev/null | cut -d' ' -f1) || return 1
  case $last in ''|*[!0-9]*) last=0;; esac
  n=$((last + 1))
}
until next; do sleep 0.1; done
while :; do
  if [ "$HOLD" = hold ]; then echo "$n $(sum $n)" >&3; else echo "$n $(sum $n)" >>"$R"; fi 2>/dev/null || {
    sleep 0.1; until next; do sleep 0.1; done; continue; }
  until sync "$R" 2>/dev/null; do failed=1; sleep 0.1; done
  # the record is on disk: report it outside /data
  echo "OSIMG-W $n $n" >/dev/ttyS0
  if [ -n "${failed:-}" ]; then failed=; until next; do sleep 0.1; done; else n=$((n + 1)); fi
  sleep "$PAUSE"
done
"""


@dataclass
class Writer:
    """How the writer runs: its file, its pace, and whether it holds /data open between records."""

    records: str = RECORDS
    pause: float = 0.02
    hold: bool = False

    def start_command(self) -> str:
        """A shell command line that starts the writer detached, unless it already runs (idempotent,
        so it can be a guest's ``quiesce.start``)."""
        prog = sh_quote(PROGRAM)
        args = " ".join(sh_quote(a) for a in (self.records, f"{self.pause:g}", "hold" if self.hold else "-"))
        return (f"[ -f {PIDFILE} ] && kill -0 \"$(cat {PIDFILE})\" 2>/dev/null || "
                f"setsid sh -c {prog} osimg-writer {args} </dev/null >/dev/null 2>&1 &")

    def start(self, ctx: Context, g: guests.Guest) -> None:
        guest_sh(ctx, g, self.start_command() + "\n", "starting the test writer")

    @staticmethod
    def stop(ctx: Context, g: guests.Guest) -> None:
        """End the writer (if it runs) and wait until it is gone, so the file no longer grows."""
        guest_sh(ctx, g, f"""
[ -f {PIDFILE} ] || exit 0
p=$(cat {PIDFILE}); kill "$p" 2>/dev/null
n=0; while kill -0 "$p" 2>/dev/null && [ $n -lt 100 ]; do n=$((n+1)); sleep 0.05; done
rm -f {PIDFILE}
""", "stopping the test writer")


def read_records(ctx: Context, g: guests.Guest, path: str = RECORDS) -> str:
    """The records file as the guest sees it (through the agent: no SSH handshake per read)."""
    return guest_sh(ctx, g, f"cat {sh_quote(path)}\n", "reading the records")


def checksum(n: int) -> str:
    return hashlib.md5(f"osimg-record-{n}".encode()).hexdigest()[:8]


@dataclass
class Verdict:
    count: int
    reported: int

    def __str__(self) -> str:
        return f"{self.count} records, {self.reported} reported synced"


def check(text: str, synced: list[int], minimum: int = 1) -> Verdict:
    """The records file is 1..N, gap-free and in order, no corrupt line, and holds every number the
    writer reported synced; a number reported twice means a synced record was lost and written again."""
    lines = text.splitlines()
    assert text == "" or text.endswith("\n"), f"last record cut short: {lines[-1]!r}"
    for i, line in enumerate(lines, 1):
        want = f"{i} {checksum(i)}"
        assert line == want, f"line {i} is {line!r}, expected {want!r} (gap, reorder or corruption)"
    n = len(lines)
    assert n >= minimum, f"only {n} records, expected at least {minimum}"
    dupes = sorted({x for x in synced if synced.count(x) > 1})
    assert not dupes, f"numbers reported synced twice (a synced record was lost and rewritten): {dupes[:10]}"
    missing = [x for x in synced if x > n]
    assert not missing, f"records reported synced but missing from the file (it ends at {n}): {missing[:10]}"
    return Verdict(n, len(synced))


@dataclass
class ConsoleWatch:
    """Follow a guest's serial log file and collect the writer's reports.

    A cold swap deletes the log and a restore truncates it: the watch keeps its open file until it
    has read it to the end, then moves on to the file now at the path (or rereads a truncated one)."""

    path: Path
    synced: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> ConsoleWatch:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, settle: float = 0.5) -> list[int]:
        """The numbers reported synced; a second call (the ``with`` block's end) returns at once."""
        if self._stop.is_set():
            return self.synced
        time.sleep(settle)  # the last report written before the writer stopped reaches the file
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        return self.synced

    def _run(self) -> None:
        f = None
        buf = b""
        while True:
            stopping = self._stop.is_set()
            if f is None:
                try:
                    f = self.path.open("rb")
                except OSError:
                    f = None
            if f is not None:
                chunk = f.read()
                if chunk:
                    buf += chunk
                    *done, buf = buf.split(b"\n")
                    for line in done:
                        self.synced += [int(a) for a, b in REPORT.findall(line) if a == b]
                else:
                    try:
                        st = self.path.stat()
                        same = st.st_ino == os.fstat(f.fileno()).st_ino
                    except OSError:
                        same = False
                    if not same or st.st_size < f.tell():
                        f.close()
                        f = None
                        buf = b""
            if stopping:
                if buf:
                    self.synced += [int(a) for a, b in REPORT.findall(buf) if a == b]
                if f is not None:
                    f.close()
                return
            time.sleep(0.05)
