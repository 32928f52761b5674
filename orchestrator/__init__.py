"""osimg: operating system image management for fleets of QEMU/KVM guests on libvirt hosts."""

__version__ = "0.1.0"
