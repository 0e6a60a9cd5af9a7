"""Corruption names, groups, severities and the severity parameter tables; the optional library.

The 15 ImageNet-C corruptions (Hendrycks & Dietterich, ICLR 2019) in four groups, and the four
hold-out ("validation") corruptions, in the order of the library's ``corruption_tuple`` (that order
is part of every image's seed, so it never changes).

Two parameter tables:

- ``imagenet``: ImageNet-C's parameters as implemented by ``imagecorruptions-imaug`` 1.1.5 (calibrated
  for 224 px images; on 28/32 px images they are much stronger). All 19 corruptions.
- ``cifar``: CIFAR-10-C's parameters from Hendrycks' ``make_cifar_c.py``, for the noise family only
  (gaussian, shot, impulse, speckle), which bnadapt generates in torch (:mod:`.torch_noise`).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from bnadapt.errors import BnadaptError, check, check_choice, check_int

NOISE = ("gaussian_noise", "shot_noise", "impulse_noise")
BLUR = ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur")
WEATHER = ("snow", "frost", "fog", "brightness")
DIGITAL = ("contrast", "elastic_transform", "pixelate", "jpeg_compression")
HOLD_OUT = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
COMMON = NOISE + BLUR + WEATHER + DIGITAL
"""The 15 corruptions mCE and relative mCE average over."""
ALL = COMMON + HOLD_OUT
"""All 19, in the library's order (the index is a key of every image's seed)."""
GROUPS = {"noise": NOISE, "blur": BLUR, "weather": WEATHER, "digital": DIGITAL, "hold-out": HOLD_OUT}
SETS = {"all": ALL, "common": COMMON, **GROUPS}
SEVERITIES = (1, 2, 3, 4, 5)
TORCH_NOISE = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise")
"""The corruptions :mod:`bnadapt.corruptions.torch_noise` generates (both tables)."""
SEEDED_BY_LIBRARY = ("impulse_noise", "glass_blur")
"""Corruptions whose library function takes ``seed=`` (they ignore NumPy's global seed)."""

LIBRARY = "imagecorruptions-imaug"
LIBRARY_VERSION = "1.1.5"
INSTALL = ("pip install -c constraints.txt opencv-python-headless scikit-image numba && "
           f"pip install --no-deps {LIBRARY}=={LIBRARY_VERSION} (or: pip install -e '.[corruptions]' --no-deps "
           "after the first command; scripts/setup.sh does both)")

PARAMS = ("imagenet", "cifar")
PARAM_SOURCES = {
    "imagenet": f"ImageNet-C parameters (Hendrycks & Dietterich 2019; as implemented in {LIBRARY} "
                f"{LIBRARY_VERSION}), calibrated for 224 px images",
    "cifar": "CIFAR-10-C parameters (hendrycks/robustness ImageNet-C/create_c/make_cifar_c.py, commit ca36008), "
             "calibrated for 32 px images; noise family only",
}
PARAM_LABELS = {"imagenet": "ImageNet-C severity parameters (224 px calibration)",
                "cifar": "CIFAR-10-C severity parameters (32 px calibration)"}

# The library's ImageNet-C table, transcribed from imagecorruptions-imaug 1.1.5 corruptions.py (one entry per
# severity 1..5; tuples are the function's ``c``). zoom_blur lists (start, stop, step) of np.arange.
IMAGENET_TABLE: dict[str, list] = {
    "gaussian_noise": [0.08, 0.12, 0.18, 0.26, 0.38],
    "shot_noise": [60, 25, 12, 5, 3],
    "impulse_noise": [0.03, 0.06, 0.09, 0.17, 0.27],
    "defocus_blur": [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)],
    "glass_blur": [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)],
    "motion_blur": [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)],
    "zoom_blur": [(1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02), (1, 1.31, 0.03)],
    "snow": [(0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
             (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)],
    "frost": [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)],
    "fog": [(1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)],
    "brightness": [0.1, 0.2, 0.3, 0.4, 0.5],
    "contrast": [0.4, 0.3, 0.2, 0.1, 0.05],
    "elastic_transform": [12.5, 16.25, 21.25, 25.0, 30.0],
    "pixelate": [0.6, 0.5, 0.4, 0.3, 0.25],
    "jpeg_compression": [25, 18, 15, 10, 7],
    "speckle_noise": [0.15, 0.2, 0.35, 0.45, 0.6],
    "gaussian_blur": [1, 2, 3, 4, 6],
    "spatter": [(0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0), (0.65, 0.3, 2, 0.68, 0.5, 0),
                (0.65, 0.3, 1, 0.65, 1.5, 1), (0.67, 0.4, 1, 0.65, 1.5, 1)],
    "saturate": [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)],
}
# CIFAR-10-C's noise family (make_cifar_c.py): gaussian sigma, shot photons per unit, impulse amount, speckle sigma.
CIFAR_NOISE_TABLE: dict[str, list] = {
    "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],
    "shot_noise": [500, 250, 100, 75, 50],
    "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],
    "speckle_noise": [0.06, 0.1, 0.12, 0.16, 0.2],
}
TABLES = {"imagenet": IMAGENET_TABLE, "cifar": CIFAR_NOISE_TABLE}


def check_params(params: str, name: str = "params") -> str:
    """``imagenet`` or ``cifar`` (the severity parameter table)."""
    return check_choice(params, PARAMS, f"{name} (severity parameter table)")


def check_severity(severity, name: str = "severity", *, clean: bool = False) -> int:
    """An integer severity in 1..5; with ``clean``, 0 (the clean image) too."""
    if clean:
        return check_int(severity, name, min=0, max=5, hint="0 = the clean image, 1..5 a corruption's severities")
    return check_int(severity, name, min=1, max=5, hint="ImageNet-C and CIFAR-10-C have severities 1 to 5")


def check_corruption(name: str, what: str = "corruption") -> str:
    """One of the 19 corruption names."""
    check(name in ALL, f"unknown {what} {name!r}; choose from {', '.join(ALL)} (or the sets "
                       f"{', '.join(SETS)})")
    return name


def parse_corruptions(spec: str | Iterable[str] | None, what: str = "corruptions") -> list[str]:
    """Corruption names from a comma-separated string or a list of names and set names (``all``,
    ``common``, ``noise``, ``blur``, ``weather``, ``digital``, ``hold-out``), in the canonical order,
    without duplicates. ``None`` means all 19."""
    if spec is None:
        return list(ALL)
    items = [t.strip() for t in spec.split(",")] if isinstance(spec, str) else [str(t).strip() for t in spec]
    items = [t for t in items if t]
    check(bool(items), f"{what} is empty; name corruptions or a set ({', '.join(SETS)})")
    chosen: set[str] = set()
    for t in items:
        key = t.lower().replace("_", "-") if t.lower().replace("_", "-") in SETS else t.lower()
        if key in SETS:
            chosen.update(SETS[key])
        else:
            chosen.add(check_corruption(key, what.rstrip("s")))
    return [c for c in ALL if c in chosen]


def table_for(params: str, corruptions: Sequence[str]) -> dict[str, list]:
    """The rows of table ``params`` for ``corruptions``; the ``cifar`` table covers the noise family
    only, anything else is a one-line error."""
    params = check_params(params)
    missing = [c for c in corruptions if c not in TABLES[params]]
    check(not missing, f"the {params} parameter table covers {', '.join(TABLES[params])} only (not "
                       f"{', '.join(missing)}); use --params imagenet, or --corruptions noise,speckle_noise")
    return {c: TABLES[params][c] for c in corruptions}


def corruption_seed(seed: int, corruption: str, severity: int, index: int) -> int:
    """The 32-bit seed of image ``index`` (its index in the source data set) under ``corruption`` at
    ``severity`` for a set seeded ``seed``: NumPy ``SeedSequence([seed, k, severity, index])`` with
    ``k`` the corruption's position in :data:`ALL`. It seeds NumPy's global RNG and is passed as
    ``seed=`` to the library (impulse_noise, glass_blur) and to torch's generator."""
    ss = np.random.SeedSequence([int(seed), ALL.index(corruption), int(severity), int(index)])
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def library_version() -> str | None:
    """The installed version of imagecorruptions-imaug, or None."""
    from importlib import metadata

    try:
        return metadata.version(LIBRARY)
    except metadata.PackageNotFoundError:
        return None


def require_library():
    """Import and return the ``imagecorruptions`` module of ``imagecorruptions-imaug``; a one-line
    :class:`BnadaptError` naming the install command when it (or a dependency) is missing, or when
    only the broken original ``imagecorruptions`` 1.1.2 is installed."""
    if library_version() is None:
        from importlib import metadata

        try:
            old = metadata.version("imagecorruptions")
        except metadata.PackageNotFoundError:
            old = None
        hint = (f"the original imagecorruptions {old} is installed, which breaks with NumPy 2; "
                f"pip uninstall imagecorruptions, then " if old else "")
        raise BnadaptError(f"corruption generation needs the optional package {LIBRARY} {LIBRARY_VERSION}; "
                           f"{hint}install it with: {INSTALL}")
    try:
        import imagecorruptions  # noqa: PLC0415
    except ImportError as e:
        raise BnadaptError(f"{LIBRARY} is installed but cannot be imported ({e}); install its dependencies: "
                           f"{INSTALL}") from None
    return imagecorruptions


def describe_params(params: str) -> dict:
    """The ``params`` block recorded in manifests and results: name, label, source."""
    return {"name": params, "label": PARAM_LABELS[params], "source": PARAM_SOURCES[params]}

