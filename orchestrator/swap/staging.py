"""Staged page-in: a warm swap's per-guest work on the new OS, done before the guest is quiesced.

A golden state resumes with its builder's identity and none of the guest's settings. Applying them
live after the page-in (host key, machine-id, hostname, address, accounts, modules, mounts) is guest
shell work: ~0.6 s on the tiny image and ~2 s on Debian under TCG, all of it inside the downtime.
So before the quiesce the golden state is restored into a *staging domain* on the guest's new
overlay: its own name (the guest's with ``~staged``, which no guest name can contain) and UUID, no
port forwards, no data volume, no config drive, its own console log. There its RNG is reseeded
with host entropy (it is a page-in like any other), the guest's customization without the data
volume is applied through the guest agent, and the domain is saved; that save file, given the
guest's own identity (``host.domain.rewrite_identity``, a new VM generation ID), is the guest's
page-in file. The window then only restores it, re-plugs the data volume and runs what needs the
data volume (``customize.live_script(part="data")``).

What cannot be staged, and why:

- The data volume's mount, carried process trees, init scripts and the application: the data
  volume belongs to the running old OS until its quiesce (two writers on one ext4 would corrupt
  it), and the application keeps its state there. Starting the application early, waiting for
  /data, would need every image's application written that way; the images' own start scripts
  refuse to start without /data (the tiny image's counter would land on the root file system), so
  the application starts in the window, right after the mount.
- The clock and a last reseed: time passes between staging and page-in, so the window's first
  guest command (``steps.reseed``) sets the clock, with fresh entropy in the same call.
- Guests on a libvirt network (``network:``): a staging domain with the guest's MAC (part of the
  saved device state) on the same bridge as the running guest would confuse the network (and a
  static address would be on it twice). They keep the live customization in the window.

A staging domain lives only inside the swap's prepare step. The files it uses are in the swap's
journal entry, and ``steps.discard`` (the prepare's failure path, and ``resume`` after a kill)
tears down a staging domain that is left.
"""

from __future__ import annotations

import dataclasses
import uuid as uuidlib
from pathlib import Path

from .. import guests
from ..context import Context
from ..customize import live_script, sh_quote
from ..errors import GuestError
from ..failpoints import failpoint
from ..host import qemu_img
from ..host.domain import DomainSpec
from ..images import catalog
from .steps import PAGEIN_FILE, page_in_file, reseed, staging_name

STAGED_FILE = "staged.sav"  # the golden state under the staging identity, then the staged save
STAGING_LOG = "staging.log"
STAND_IN = "data-stand-in.qcow2"  # an empty disk where the data volume will be
FILES = [STAGED_FILE, STAGING_LOG, STAND_IN]  # what a swap's journal lists for staging (removed by discard)
# waits in the staging domain until the stand-in disk (found by its serial) is there
WAIT_STAND_IN = """n=0; while :; do for b in /sys/block/*; do s=; read -r s 2>/dev/null <"$b/serial"
  [ "$s" = SERIAL ] && exit 0; done; n=$((n+1)); [ $n -gt 600 ] && break; sleep 0.05; done
echo 'the stand-in data disk did not appear' >&2; exit 1
"""


def possible(g: guests.Guest) -> bool:
    """Staging needs a guest on user-mode networking (its own slirp, see the module docstring) and,
    for now, on this host (the staged state is saved and rewritten here)."""
    return not g.network and g.host is None


def staging_spec(spec: DomainSpec, gdir: Path) -> DomainSpec:
    """The guest's domain as a staging domain: own name and UUID, no forwards, only its OS disk."""
    net = dataclasses.replace(spec.net, forwards={}) if spec.net is not None else None
    return dataclasses.replace(spec, name=staging_name(spec.name), uuid=str(uuidlib.uuid4()),
                               serial_log=str(gdir / STAGING_LOG), net=net,
                               disks=[d for d in spec.disks if d.target == "vda"])


def stage(ctx: Context, new: guests.Guest, target: catalog.BootImage, machine_id: str,
          read_ahead: list[str] | None = None) -> None:
    """Write ``new``'s page-in file: the golden state of ``target`` customized in a staging domain.

    ``new`` is the guest's record as it will be on the target (its new overlay exists). The files in
    ``read_ahead`` (absolute paths in the new OS) are read once there, so the staged state has them
    in its page cache.
    """
    assert target.state_file is not None
    gdir = new.dir(ctx)
    spec = guests.domain_spec(ctx, new)
    staging = staging_spec(spec, gdir)
    staged = gdir / STAGED_FILE
    ctx.hv.destroy(staging.name)  # a staging domain of an earlier, killed swap (its journal entry is gone)
    page_in_file(ctx, target.state_file, new.files(ctx), STAGED_FILE, staging)
    ctx.hv.restore(str(staged))
    failpoint("warm-staging")
    try:
        script = live_script(new.custom(), new.name, new.data_uuid, new.own_key(ctx), machine_id, part="staged")
        data = guests.data_disk(ctx, new)
        if data is not None and data.path:
            # An empty disk of the data volume's size in the data volume's slot: the staged OS sees
            # its hot-plug now (while its agent reconnects), and the page-in file's XML then names
            # the data volume itself. The window needs no hot-plug (under TCG the guest takes ~0.5 s
            # to notice a new disk).
            qemu_img.create_blank(gdir / STAND_IN, qemu_img.info(data.path).virtual_size)
            ctx.hv.attach_disk(staging.name, dataclasses.replace(data, path=str(gdir / STAND_IN)))
            script += WAIT_STAND_IN.replace("SERIAL", sh_quote(guests.DATA_SERIAL))
        if read_ahead:
            script += f"cat -- {' '.join(map(sh_quote, read_ahead))} >/dev/null 2>&1\n"
        reseed(ctx, staging.name)  # the golden RNG state must not reach this guest's saved state
        rc, out, err = ctx.hv.guest_exec(staging.name, ["/bin/sh", "-s"], stdin=script, timeout=120)
        if rc != 0:
            raise GuestError(f"{new.name}: the staged customization failed ({rc}): {(err or out).strip()[-300:]}")
        staged.unlink()  # QEMU read it at the restore; the save below writes a new file in its place
        ctx.hv.save(staging.name, str(staged))
    finally:
        ctx.hv.destroy(staging.name)
    page_in_file(ctx, staged, new.files(ctx), PAGEIN_FILE, spec)
    staged.unlink()
    (gdir / STAGING_LOG).unlink(missing_ok=True)
    (gdir / STAND_IN).unlink(missing_ok=True)

