"""Imported once by the fork server that starts generation workers: loads the library and compiles
glass_blur's numba kernel there, so every worker forked from it starts warm (no per-worker compile)."""

try:  # never fail the fork server: a missing library is reported by the parent
    import numpy as _np

    from bnadapt.corruptions.generate import corrupt_block as _corrupt_block

    _corrupt_block(_np.zeros((1, 32, 32, 3), _np.uint8), "glass_blur", 1, 0, [0])
except Exception:  # noqa: BLE001
    pass
