"""The Triton attention kernels, one file per concern (``kernels/triton_attention.py`` re-exports
the names the rest of the project uses): ``attention.py`` the kernels (real Triton source),
``spec_parts.py`` the per-spec contract, ``codegen.py`` the generated per-spec parts, ``loader.py``
the kernel module of a spec and its cache, ``launch.py`` the launchers and tiles, ``ranges.py`` the
host-side block ranges."""
