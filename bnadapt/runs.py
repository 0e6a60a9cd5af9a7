"""What every experiment run needs, once each: seeds, batch slicing, progress, device, precision,
threads, and the torch.distributed (torchrun) process group.

- **Seeds.** :func:`derive_seed` maps ``(seed, *keys)`` to a 63-bit integer through NumPy's
  ``SeedSequence``; :func:`generator` wraps it in a ``torch.Generator`` on a device. Keys name the run,
  the image, the sigma ...; the values are those the foundation used, so results are unchanged.
- **Device.** :func:`resolve_device` turns ``None``/``"auto"``/``"cpu"``/``"cuda"``/``"cuda:N"`` into a
  ``torch.device`` (auto: CUDA when available; under torchrun each rank takes ``cuda:LOCAL_RANK``).
- **Precision.** :func:`autocast` runs inference in fp32 (default), bf16 or fp16 (CUDA only).
- **Progress.** :class:`Progress`: a bar on a terminal, one plain line every few seconds otherwise,
  nothing with ``quiet``.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
import zlib
from typing import Iterator

import numpy as np
import torch
from torch import nn

from bnadapt.errors import BnadaptError, check, check_choice, check_int

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------- seeds
def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from ``seed`` and integer ``keys`` (NumPy SeedSequence; stable across versions)."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *[int(k) for k in keys]])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> 1)


def generator(seed: int, *keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`derive_seed` ``(seed, *keys)``."""
    return torch.Generator(device=torch.device(device)).manual_seed(derive_seed(seed, *keys))


def name_key(text: str) -> int:
    """A generator key for a name (an attack, a constraint): its CRC-32, stable across versions and
    processes (unlike ``hash``)."""
    return zlib.crc32(text.encode())


def image_seed(seed: int, idx: int, sigma_index: int) -> int:
    """The 64-bit generator seed of image ``idx`` at the ``sigma_index``-th sigma of a run seeded ``seed``
    (certification: a resumed, sharded or distributed run draws exactly the noise of an uninterrupted one)."""
    words = np.random.SeedSequence([int(seed), int(idx), int(sigma_index)]).generate_state(2, dtype=np.uint32)
    return int(words[0]) | (int(words[1]) << 32)


def indices_sha256(indices) -> str:
    """SHA-256 of an index list written as comma-separated decimals (the subset's identity in result files)."""
    import hashlib

    return hashlib.sha256(",".join(str(int(i)) for i in np.asarray(indices).reshape(-1)).encode()).hexdigest()


# ----------------------------------------------------------------------------------------- batches
def batch_slices(n: int, batch_size: int) -> list[slice]:
    """Consecutive slices of ``batch_size`` covering ``n`` items; a trailing single item joins the
    previous batch (a batch of one image has no statistics to adapt to)."""
    check_int(batch_size, "batch size", min=1)
    bounds = list(range(0, n, batch_size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        bounds.pop(-2)
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


# ----------------------------------------------------------------------------------------- device
def cuda_available() -> bool:
    return torch.cuda.is_available()


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """The device named by ``spec``: ``None``/``"auto"`` (CUDA when available, else CPU), ``"cpu"``,
    ``"cuda"`` or ``"cuda:N"``. Under torchrun (``LOCAL_RANK`` set) a bare ``cuda`` becomes
    ``cuda:LOCAL_RANK``. A CUDA device without CUDA, an index past the last GPU, or any other string is
    a one-line error."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = "auto" if spec is None else str(spec).strip().lower()
    if spec == "auto":
        spec = "cuda" if cuda_available() else "cpu"
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise BnadaptError(f"unknown device {spec!r}; use cpu, cuda or cuda:N") from None
    check(dev.type in ("cpu", "cuda"), f"unsupported device {spec!r}; use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        check(cuda_available(), f"device {spec} requested but CUDA is not available on this machine; use --device cpu")
        if dev.index is None and "LOCAL_RANK" in os.environ:
            dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        if dev.index is not None:
            check(dev.index < torch.cuda.device_count(),
                  f"device {spec} requested but this machine has {torch.cuda.device_count()} GPU(s); "
                  f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
        else:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer); CPU for a model without tensors."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of a model's first floating-point parameter or buffer (float32 if none)."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device`` (pinned, non-blocking copy for CUDA); 4-D images in channels_last."""
    if device.type == "cuda" and x.device.type == "cpu":
        x = x.pin_memory().to(device, non_blocking=True)
    else:
        x = x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def prepare_model(model: nn.Module, device: torch.device | str = "cpu", *, compile: bool = False) -> nn.Module:
    """``model`` in eval mode on ``device`` in channels_last memory format (faster convolutions on CPU
    and GPU), optionally wrapped by ``torch.compile`` (static shapes). Converts ``model`` in place and
    returns it (or its compiled wrapper, which shares its parameters and buffers). A TorchScript model
    is moved but never compiled (it cannot be)."""
    device = torch.device(device)
    if isinstance(model, torch.jit.ScriptModule):
        return model.eval() if model_device(model) == device else model.eval().to(device)
    model = model.eval().to(device)
    model = model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model, dynamic=False)
    return model


def copy_model(model: nn.Module) -> nn.Module:
    """An independent copy of ``model`` whose parameters are leaf tensors with the original's
    ``requires_grad`` flags. (``copy.deepcopy`` of a TorchScript module with autograd on clones each
    parameter through autograd, so the copies are non-leaf and attacks cannot switch their gradients off.)"""
    import copy

    with torch.no_grad():
        new = copy.deepcopy(model)
    for p, q in zip(model.parameters(), new.parameters()):
        if q.requires_grad != p.requires_grad:
            q.requires_grad_(p.requires_grad)
    return new


def device_copy(model: nn.Module, device: torch.device | str = "cpu", *, compile: bool = False) -> nn.Module:
    """:func:`prepare_model` of a :func:`copy_model` copy: the caller's model stays as it is."""
    return prepare_model(copy_model(model), device, compile=compile)


# ----------------------------------------------------------------------------------------- precision
def check_precision(precision: str, device: torch.device, name: str = "precision") -> str:
    """``fp32``, ``bf16`` or ``fp16``; fp16 needs CUDA (CPU kernels for half precision are slow or missing)."""
    check_choice(precision, PRECISIONS, name)
    check(not (precision == "fp16" and device.type != "cuda"),
          f"{name} fp16 needs a CUDA device (got {device}); use fp32 or bf16 on the CPU")
    return precision


def autocast(device: torch.device, precision: str = "fp32"):
    """A context that runs forwards at ``precision`` on ``device`` (fp32: no change). The model's
    weights stay fp32; matrix products and convolutions run in the lower precision (torch.autocast)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


# ----------------------------------------------------------------------------------------- threads
def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (``None`` keeps the default: one per core) and return the count in use."""
    if threads is not None:
        torch.set_num_threads(check_int(threads, "--threads", min=1))
    return torch.get_num_threads()


# ----------------------------------------------------------------------------------------- progress
class Progress:
    """Progress of a long loop: a tqdm bar on a terminal; off a terminal (logs, CI) one plain line
    every ``interval`` seconds (``desc: done/total unit (pct), elapsed, eta``), also while one long unit
    of work runs (a heartbeat thread writes the line when no update came for ``interval`` seconds, with
    what :func:`progress_note` last said is running); nothing when ``quiet``. Use as a context manager
    or call :meth:`close`."""

    def __init__(self, total: int, desc: str, *, unit: str = "img", quiet: bool = False,
                 interval: float = 10.0, stream=None, leave: bool = True):
        self.total, self.desc, self.unit, self.quiet = int(total), desc, unit, bool(quiet)
        self.stream = stream or sys.stderr
        self.n, self.interval, self.postfix = 0, float(interval), ""
        self._t0 = self._last = time.monotonic()
        self._bar = None
        self.now = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat = None
        if not self.quiet and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, dynamic_ncols=True, file=self.stream,
                             leave=leave, mininterval=0.5)
        elif not self.quiet and self.interval > 0:
            self._beat = threading.Thread(target=self._heartbeat, name="bnadapt-progress", daemon=True)
            self._beat.start()
        _OPEN.append(self)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.interval / 2):
            with self._lock:
                now = time.monotonic()
                if not self.quiet and now - self._last >= self.interval:
                    self._last = now
                    self._line()

    def note(self, text: str) -> None:
        """Say what is running now (shown in the next line, or in the bar)."""
        self.now = str(text)
        if self._bar is not None:
            self._bar.set_postfix_str(self.now, refresh=False)

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        with self._lock:
            now = time.monotonic()
            if now - self._last >= self.interval:
                self._last = now
                self._line()

    def set_postfix(self, **kw) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())
        if self._bar is not None:
            self._bar.set_postfix(kw, refresh=False)

    def _line(self, final: bool = False) -> None:
        elapsed = time.monotonic() - self._t0
        pct = 100.0 * self.n / self.total if self.total else 100.0
        eta = elapsed * (self.total - self.n) / self.n if self.n and not final else 0.0
        extra = f", {self.postfix}" if self.postfix else ""
        if self.now and not final:
            extra += f", now: {self.now}"
        tail = "done" if final else (f"eta {_hms(eta)}" if self.n else "eta ?")
        print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({pct:.0f}%), {_hms(elapsed)} elapsed, {tail}{extra}",
              file=self.stream, flush=True)

    def close(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        if self in _OPEN:
            _OPEN.remove(self)
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif not self.quiet and self.n and time.monotonic() - self._t0 >= self.interval:
            self._line(final=True)
        self.quiet = True

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_OPEN: list[Progress] = []  # open progress displays, innermost last


def progress_note(text: str) -> None:
    """Tell the innermost open :class:`Progress` what is running now (no-op when none is open): long
    units of work name their current step (e.g. the attack and batch) in the heartbeat lines."""
    if _OPEN:
        _OPEN[-1].note(text)


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# ----------------------------------------------------------------------------------------- torchrun
def world() -> tuple[int, int]:
    """``(rank, world_size)`` of an initialized process group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def dist_init(device: torch.device) -> bool:
    """Join the torchrun process group when ``WORLD_SIZE > 1`` (nccl on CUDA, gloo on CPU); returns
    whether this process is one rank of several. Idempotent."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def dist_cleanup() -> None:
    """Destroy the default process group if one is up (at exit of every distributed command)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(device: torch.device) -> Iterator[bool]:
    """``with distributed(device) as multi:`` joins the torchrun group when there is one and always
    destroys it on exit."""
    try:
        yield dist_init(device)
    finally:
        dist_cleanup()


def ceil_div(a: int, b: int) -> int:
    return int(math.ceil(a / b))
