"""osimg: cloud-init's ``mounts`` module, also for ``UUID=`` and ``LABEL=`` devices.

cloud-init 22.4 (Debian 12) maps each ``mounts`` device to a block device under /sys/block and
drops ``UUID=...`` and ``LABEL=...`` entries as "nonexistent" (upstream canonical/cloud-init#4102).
osimg names data volumes by filesystem UUID, which fstab and mount(8) understand, so such an entry
is kept as written when a filesystem with that tag exists.

cloud-init looks a module up as a top-level ``cc_<name>`` before ``cloudinit.config.cc_<name>``,
so this file takes the place of the ``mounts`` module while the configuration keeps cloud-init's
own module name (which its schema validation requires).
"""

from cloudinit import subp
from cloudinit.config import cc_mounts as upstream

meta = upstream.meta

_sanitize_devname = upstream.sanitize_devname


def _sanitize_devname_or_tag(startname, transformer, log, aliases=None):
    if startname.startswith(("UUID=", "LABEL=")):
        try:
            subp.subp(["findfs", startname])
        except subp.ProcessExecutionError:
            log.debug("No filesystem with %s", startname)
            return None
        return startname
    return _sanitize_devname(startname, transformer, log, aliases)


def handle(name, cfg, cloud, log, args):
    upstream.sanitize_devname = _sanitize_devname_or_tag
    upstream.handle(name, cfg, cloud, log, args)
