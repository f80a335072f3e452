"""Guest images for microVMs: the guest kernel (config fragments, reproducible build,
cache) and the recipe for a template's bootable ext4 image.

The kernel is built from Debian's `linux-source-6.1` with the committed fragments in
`configs/`, once per set of inputs, and cached under `<cache_dir>/kernels/<id>/`.
"""
