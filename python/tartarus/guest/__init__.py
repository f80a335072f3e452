"""The microVM guest kernel: config fragments, reproducible build, cache. (A template's
bootable ext4 image, with the agent as /sbin/init, comes from `tartarus.images`.)

The kernel is built from Debian's `linux-source-6.1` with the committed fragments in
`configs/`, once per set of inputs, and cached under `<cache_dir>/kernels/<id>/`.
"""
