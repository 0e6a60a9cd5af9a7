"""One exception type for every user-facing error, and the validators shared by every experiment.

The CLI prints ``error: <message>`` on one line and exits with code 2. Messages name the problem
and the fix. Each kind of value (a noise level, a count, a probability, rho, a seed ...) has exactly
one validator here; library functions call it with the Python name (``"rho"``), the CLI with the
option name (``"--rho"``), so the message speaks the caller's language.
"""

from __future__ import annotations

import errno
import math
from typing import Any, Iterable, Sequence


class BnadaptError(ValueError):
    """Bad input (argument, file, model, data). Its message is one line: the problem and the fix."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`BnadaptError` with ``message`` when ``condition`` is false."""
    if not condition:
        raise BnadaptError(message)


_WRITE_CAUSES = {
    errno.EROFS: ("the file system is read-only", "choose a path on a writable disk"),
    errno.ENOSPC: ("no space left on the device", "free space or choose another disk"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space or choose another disk"),
    errno.EACCES: ("not allowed (permission denied)", "check its permissions or choose another path"),
    errno.EPERM: ("not allowed (operation not permitted)", "choose another path"),
    errno.ENOENT: ("the folder does not take new files", "choose another path"),
    errno.ENOTDIR: ("a part of the path is not a folder", "choose another path"),
    errno.EFBIG: ("the file is too large for this file system", "choose another disk"),
}

WRITE_ERRNOS = frozenset(_WRITE_CAUSES) - {errno.ENOENT, errno.ENOTDIR}
"""Errors of a file system that refuses a write (as opposed to a bug): read-only, full, not allowed."""


def write_error(path: Any, e: OSError, what: str = "") -> BnadaptError:
    """The one-line error for an ``OSError`` met while writing ``path``: the path, the cause in words
    (read-only, no space, not allowed, ...) and the fix. ``what`` names the option (``--out``)."""
    cause, fix = _WRITE_CAUSES.get(e.errno or -1, (e.strerror or type(e).__name__, "choose another path"))
    lead = f"{what} {path}" if what else f"{path}"
    return BnadaptError(f"cannot write {lead}: {cause}; {fix}")


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        import numpy as np

        if isinstance(value, np.integer):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(value, int)


def check_int(value: Any, name: str, *, min: int | None = None, max: int | None = None, hint: str = "") -> int:
    """An integer within ``[min, max]`` (either bound optional); booleans and non-integral floats are refused."""
    if not _is_int(value):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise BnadaptError(f"{name} must be an integer (got {value!r}){'; ' + hint if hint else ''}")
    value = int(value)
    if min is not None and value < min:
        raise BnadaptError(f"{name} must be >= {min} (got {value}){'; ' + hint if hint else ''}")
    if max is not None and value > max:
        raise BnadaptError(f"{name} must be <= {max} (got {value}){'; ' + hint if hint else ''}")
    return value


def check_float(value: Any, name: str, *, min: float | None = None, max: float | None = None,
                min_open: bool = False, max_open: bool = False, hint: str = "") -> float:
    """A finite number within the given bounds (``min_open``/``max_open`` exclude the bound)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise BnadaptError(f"{name} must be a number (got {value!r}){'; ' + hint if hint else ''}") from None
    if isinstance(value, bool) or not math.isfinite(v):
        raise BnadaptError(f"{name} must be a finite number (got {value!r}){'; ' + hint if hint else ''}")
    lo = "(" if min_open else "["
    hi = ")" if max_open else "]"
    interval = f"{lo}{'-inf' if min is None else f'{min:g}'}, {'inf' if max is None else f'{max:g}'}{hi}"
    bad = (min is not None and (v < min or (min_open and v == min))) or \
          (max is not None and (v > max or (max_open and v == max)))
    if bad:
        raise BnadaptError(f"{name} must lie in {interval} (got {v:g}){'; ' + hint if hint else ''}")
    return v


def check_sigma(sigma: Any, name: str = "sigma", *, positive: bool = False) -> float:
    """A Gaussian noise level in pixel units: ``>= 0``, or ``> 0`` with ``positive``."""
    return check_float(sigma, name, min=0.0, min_open=positive,
                       hint="it is the noise standard deviation in pixel units, e.g. 0.25 or 0.5")


def check_rho(rho: Any, name: str = "rho") -> float:
    """The adaptation momentum rho in [0, 1] (0 = no adaptation, 1 = full adaptation)."""
    return check_float(rho, name, min=0.0, max=1.0, hint="0 = no adaptation, 1 = full adaptation")


def check_alpha(alpha: Any, name: str = "alpha") -> float:
    """A failure probability strictly between 0 and 1."""
    return check_float(alpha, name, min=0.0, max=1.0, min_open=True, max_open=True,
                       hint="e.g. 0.001 for 99.9% confidence")


def check_fraction(q: Any, name: str) -> float:
    """A fraction strictly between 0 and 1 (e.g. the poisoned share of a batch)."""
    return check_float(q, name, min=0.0, max=1.0, min_open=True, max_open=True)


def check_count(n: Any, name: str, *, min: int = 1, hint: str = "") -> int:
    """A count (images, samples, runs, steps ...): an integer ``>= min`` (default 1)."""
    return check_int(n, name, min=min, hint=hint)


def check_seed(seed: Any, name: str = "seed") -> int:
    """A seed: an integer >= 0 (seeds feed NumPy's SeedSequence, which refuses negatives)."""
    return check_int(seed, name, min=0, hint="seeds are integers >= 0")


def check_batch_size(batch_size: Any, name: str = "batch size", *, adapting: bool = False) -> int:
    """A test batch size: >= 1, or >= 2 when the batch's own statistics are used (adaptation)."""
    if adapting:
        return check_int(batch_size, name, min=2,
                         hint="per-batch adaptation estimates statistics from the batch, which needs two images")
    return check_int(batch_size, name, min=1)


def check_adapt_images(n: int, what: str = "the selection") -> int:
    """At least 2 images to adapt on: per-batch adaptation of a single image would normalize it with its
    own statistics only (an instance norm, not the paper's method), which the zoo's models answer with
    chance-level or worse predictions."""
    return check_int(n, f"the number of images in {what}", min=2,
                     hint="per-batch adaptation needs batches of at least 2 images; select more with --images")


def check_choice(value: Any, choices: Iterable[str], name: str) -> str:
    """One of ``choices`` (strings), else a one-line error listing them."""
    choices = list(choices)
    check(value in choices, f"unknown {name} {value!r}; choose one of {', '.join(map(str, choices))}")
    return value


def check_unique(values: Sequence[Any], name: str) -> list:
    """A non-empty list without duplicates."""
    values = list(values)
    check(len(values) >= 1, f"{name} is empty; give at least one value")
    check(len(set(values)) == len(values), f"{name} contains duplicates ({values}); give each value once")
    return values
