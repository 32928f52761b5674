"""VIOS: storage-server nodes that export LUs over NBD to guests as virtio-scsi disks.

- ``lus``: LU and export records in the cluster store (define, export, delete).
- ``node``: the node daemon (registration, rejoin, serving, primary duties) and its process control.
- ``exports``: host-service backend, one ``qemu-storage-daemon`` per node on a unix socket.
- ``guest``: VIOS-guest backend, a domain that has the LUs attached and serves them with qemu-nbd
  through 127.0.0.1 port forwards; and client guests booting from its exports.
- ``attach``: client side (IDs, reservations, libvirt or QMP disks); ``failover``: redundant VIOS.
"""

from .attach import Attachment, detach, list_attachments
from .failover import check as check_failover
from .lus import LU, Export, define_lu, delete_lu, export_lu, exports_of, get_lu, list_lus, unexport

__all__ = [
    "LU",
    "Attachment",
    "Export",
    "check_failover",
    "define_lu",
    "delete_lu",
    "detach",
    "export_lu",
    "exports_of",
    "get_lu",
    "list_attachments",
    "list_lus",
    "unexport",
]
