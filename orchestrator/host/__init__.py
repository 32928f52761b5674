"""The host: one libvirt connection (``libvirt``), domain XML and save files as data (``domain``),
qemu-img and mkfs (``qemu_img``), SSH into guests (``ssh``), console logs (``console``).

The lowest layer above ``errors``/``settings``/``validate``: it knows libvirt, QEMU and SSH, and
nothing of guests, images or the cluster store.
"""
