"""Test streams: which image comes when, and what happens to it (docs/stream.md, "Scenarios").

A :class:`Stream` is a seeded, reproducible sequence of ``length`` positions over the images of a
:class:`~bnadapt.data.Selection`; position ``t`` holds a dataset index and a *domain*: a transform of
that image. Two domain types:

- **noise** (the default): Gaussian pixel noise of a standard deviation ``sigma[t]`` (0 = clean;
  ``x + sigma * z``, no clipping, ``z`` a unit normal fixed per position).
- **corruption** (``corrupted=`` a :class:`CorruptedSource`, a corrupted set): position ``t`` also
  carries ``(corruption[t], severity[t])``; its image is the corrupted set's version of the *same*
  source image (severity 0 = the clean image), then ``+ sigma * z`` for a constant ``sigma``
  (default 0). The scenario then drives the corruption and severity; ``sigma`` does not drift.

Scenarios (:data:`SCENARIOS`), with their noise / corruption domains:

- ``iid``: images in a seeded random order; one noise level ``sigma`` / one corruption at ``severity``.
- ``class-sorted``: label-correlated order controlled by a Dirichlet concentration (RoTTA's temporal
  sampler, Yuan et al. 2023): the stream is cut into K slots (K = number of classes); each class's images
  are split over the slots in proportions drawn from ``Dir(concentration)``, and each slot plays its
  classes one after another, each as a contiguous run, in a random order. Smaller concentration => a
  class falls into fewer slots => longer same-class runs (-> 0: sorted by class; large: every class in
  every slot, runs of about n_c / K). Needs labels. One domain, as ``iid``.
- ``gradual``: i.i.d. order; sigma drifts linearly from ``sigma_start`` (first image) to ``sigma`` (last)
  / the severity of one corruption steps from ``severity_start`` to ``severity`` in equal plateaus
  (level ``k`` of the ``K`` levels holds positions ``[k L / K, (k + 1) L / K)``; monotone).
- ``mixed``: i.i.d. order; each position's sigma drawn uniformly from ``sigmas`` / its domain uniformly
  from ``corruptions x severities`` (domains interleaved; severity 0 in ``severities`` adds the clean one).
- ``shift``: i.i.d. order; ``sigma_start`` before position ``round(change_at * length)``, ``sigma`` after
  / ``(corruptions[0], severity_start)`` before, ``(corruptions[-1], severity)`` after (one corruption:
  ``severity_start`` defaults to 0, clean -> corrupted; two: a change of corruption at ``severity``).

The images: the selection in seeded random orders, pass after pass, cut at ``length`` (default: the
selection's size); a stream longer than the selection repeats images (with fresh noise). Everything is
drawn from ``(seed, run)`` (:func:`bnadapt.runs.derive_seed`), so equal arguments give equal streams.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from bnadapt.data.corrupted import CorruptedSource, corrupted_source  # noqa: F401 (re-exported: the match lives there)
from bnadapt.data.pipeline import batches, raw, to_float
from bnadapt.errors import check, check_choice, check_count, check_float, check_seed, check_sigma, check_unique
from bnadapt.runs import derive_seed, indices_sha256

SCENARIOS = ("iid", "class-sorted", "gradual", "mixed", "shift")
NEEDS_LABELS = ("class-sorted",)
ORDER_KEY, NOISE_KEY = 0x5743, 0x5744  # stream keys of (seed, run, key, ...)
NOISE_BLOCK = 256  # unit noise is drawn per block of positions: the same noise whatever the batch size


@dataclass
class Stream:
    """One stream: dataset ``indices`` and per-position ``sigma`` (both length ``len(stream)``), the
    ``labels`` at those positions (None for data without labels) and how it was made. A corrupted
    stream also has per-position ``corruption`` (an index into ``corruptions``; -1 = none) and
    ``severity`` (0 = clean, 1..5), and the ``source`` its images come from."""

    indices: np.ndarray
    sigma: np.ndarray
    labels: np.ndarray | None
    scenario: str
    params: dict = field(default_factory=dict)
    seed: int = 0
    run: int = 0
    corruption: np.ndarray | None = None
    severity: np.ndarray | None = None
    corruptions: tuple[str, ...] = ()
    source: "CorruptedSource | None" = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return int(len(self.indices))

    def domains(self) -> np.ndarray:
        """One integer per position naming its corruption domain: ``(corruption + 1) * 6 + severity``
        (0 = clean); all zeros for a noise stream."""
        if self.severity is None:
            return np.zeros(len(self), dtype=np.int64)
        return (self.corruption.astype(np.int64) + 1) * 6 + self.severity.astype(np.int64)

    def describe(self) -> dict:
        """The stream's identity and measured structure (mean same-class run length, sigma range; for a
        corrupted stream the severity range, the number of domains and of domain changes)."""
        d = {"scenario": self.scenario, "params": self.params, "length": len(self), "seed": self.seed,
             "run": self.run, "indices_sha256": indices_sha256(self.indices),
             "sigma_min": float(self.sigma.min()), "sigma_max": float(self.sigma.max())}
        if self.labels is not None:
            d["mean_label_run"] = float(np.mean(run_lengths(self.labels)))
        if self.severity is not None:
            dom = self.domains()
            d.update(corruptions=list(self.corruptions), severity_min=int(self.severity.min()),
                     severity_max=int(self.severity.max()), domains=int(len(np.unique(dom))),
                     domain_changes=int(np.sum(dom[1:] != dom[:-1])),
                     mean_domain_run=float(np.mean(run_lengths(dom))))
        return d


def run_lengths(values: np.ndarray) -> np.ndarray:
    """Lengths of the maximal runs of equal consecutive values (e.g. same-class runs of a label stream)."""
    v = np.asarray(values).reshape(-1)
    if v.size == 0:
        return np.zeros(0, dtype=np.int64)
    cuts = np.flatnonzero(v[1:] != v[:-1]) + 1
    return np.diff(np.concatenate([[0], cuts, [v.size]]))


def dataset_labels(dataset) -> np.ndarray | None:
    """The dataset's labels as an array, or None for a dataset without labels (``has_labels`` False or
    ``labels`` None)."""
    if not getattr(dataset, "has_labels", True) or getattr(dataset, "labels", None) is None:
        return None
    return np.asarray(dataset.labels)


def check_scenario(scenario: str, *, labeled: bool = True, what: str = "scenario") -> str:
    """A known scenario, and one that can run on this data (``class-sorted`` needs labels)."""
    check_choice(scenario, SCENARIOS, what)
    check(labeled or scenario not in NEEDS_LABELS,
          f"{what} {scenario} orders images by their labels, but the data has none; use iid, gradual, mixed or shift")
    return scenario


def parse_corruption_list(spec, what: str = "corruptions") -> list[str]:
    """Corruption names from a comma-separated string or a list of names and set names (``noise``,
    ``weather``, ...; see :func:`bnadapt.corruptions.names.parse_corruptions`), **in the given order**
    (a shift goes from the first to the second), each once."""
    from bnadapt.corruptions.names import parse_corruptions

    items = [t.strip() for t in spec.split(",")] if isinstance(spec, str) else [str(t).strip() for t in spec or ()]
    items = [t for t in items if t]
    check(bool(items), f"{what} is empty; name one or more corruptions, e.g. gaussian_noise or fog,contrast")
    out = [c for t in items for c in parse_corruptions(t, what)]
    return check_unique(out, what)


def check_corruption_domain(scenario: str, corruptions, *, severity=3, severity_start=None, severities=None,
                            names: dict | None = None) -> dict:
    """The corruption domain of ``scenario``, validated and with its defaults filled in:
    ``{"corruptions", "severity", "severity_start", "severities"}`` (the last two None where the scenario
    has none). ``iid``, ``class-sorted`` and ``gradual`` take one corruption, ``shift`` one or two (from
    the first to the last), ``mixed`` any number. ``severity`` is 1..5; ``severity_start`` and
    ``severities`` are 0..5 (0 = the clean image); ``severity_start`` defaults to 0 (clean), or to
    ``severity`` for a shift between two corruptions; ``severities`` (mixed) to ``[severity]``.
    ``names`` maps the argument names to option names for the messages."""
    from bnadapt.corruptions.names import check_severity

    opt = {k: k for k in ("corruptions", "severity", "severity_start", "severities")} | (names or {})
    check_choice(scenario, SCENARIOS, opt.get("scenario", "scenario"))
    corruptions = parse_corruption_list(corruptions, opt["corruptions"])
    severity = check_severity(severity, opt["severity"])
    count = {"iid": (1, 1), "class-sorted": (1, 1), "gradual": (1, 1), "shift": (1, 2)}.get(scenario, (1, None))
    check(len(corruptions) >= count[0] and (count[1] is None or len(corruptions) <= count[1]),
          f"{opt['corruptions']}: scenario {scenario} takes {'one corruption' if count[1] == 1 else 'one or two'} "
          f"(got {', '.join(corruptions)}); use scenario mixed to interleave several")
    out = {"corruptions": corruptions, "severity": severity, "severity_start": None, "severities": None}
    if scenario in ("gradual", "shift"):
        default = severity if len(corruptions) == 2 else 0
        out["severity_start"] = (default if severity_start is None else
                                 check_severity(severity_start, opt["severity_start"], clean=True))
    else:
        check(severity_start is None, f"{opt['severity_start']} applies to scenarios gradual and shift, not {scenario}")
    if scenario == "mixed":
        levels = [severity] if severities is None else [check_severity(v, opt["severities"], clean=True)
                                                        for v in severities]
        out["severities"] = check_unique(levels, opt["severities"])
    else:
        check(severities is None, f"{opt['severities']} applies to scenario mixed, not {scenario}; use "
                                  f"{opt['severity']}")
    return out


def make_stream(
    sel,
    *,
    scenario: str = "iid",
    length: int | None = None,
    sigma: float | None = None,
    sigma_start: float = 0.0,
    sigmas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75),
    change_at: float = 0.5,
    concentration: float = 0.1,
    seed: int = 0,
    run: int = 0,
    corrupted: CorruptedSource | None = None,
    corruptions=None,
    severity: int = 3,
    severity_start: int | None = None,
    severities=None,
) -> Stream:
    """The stream of ``scenario`` over the images of ``sel`` (a :class:`~bnadapt.data.Selection`) for
    run ``run`` (module docstring). ``sigma`` defaults to 0.5 for a noise stream and to 0 (no added
    noise) for a corrupted one. With ``corrupted`` (:func:`corrupted_source`; ``sel`` must hold images
    of its clean data, e.g. ``corrupted.selection()``) the scenario drives the corruption domain
    (:func:`check_corruption_domain`) and ``sigma_start``/``sigmas`` are not used. Deterministic for
    equal arguments; different runs give different orders (and, in :func:`stream_batches`, different
    noise)."""
    labels_all = dataset_labels(sel.dataset)
    check_scenario(scenario, labeled=labels_all is not None)
    n = len(sel)
    check(n >= 1, "the selection holds no images; select some with --images or --data")
    length = n if length is None else check_count(length, "stream length")
    sigma = check_sigma((0.5 if corrupted is None else 0.0) if sigma is None else sigma)
    seed = check_seed(seed)
    dom = None
    if corrupted is not None:
        dom = check_corruption_domain(scenario, corruptions, severity=severity, severity_start=severity_start,
                                      severities=severities)
        corrupted.check_corruptions(dom["corruptions"])
        corrupted.check_selection(sel)
    params: dict = {"sigma": sigma}
    rng = np.random.default_rng(derive_seed(seed, run, ORDER_KEY))
    passes = -(-length // n)
    base = np.concatenate([rng.permutation(np.asarray(sel.indices, dtype=np.int64)) for _ in range(passes)])[:length]
    labels = None if labels_all is None else labels_all[base]
    sig = np.full(length, sigma, dtype=np.float64)
    if scenario == "shift":
        change_at = check_float(change_at, "change_at", min=0.0, max=1.0,
                                hint="the fraction of the stream before the shift changes, e.g. 0.5")
    if scenario == "class-sorted":
        concentration = check_float(concentration, "concentration", min=0.0, min_open=True,
                                    hint="the Dirichlet concentration: small = long same-class runs, e.g. 0.1")
        order = _dirichlet_order(labels, concentration, rng)
        base, labels = base[order], labels[order]
        params["concentration"] = concentration
    elif dom is not None:
        pass  # the corruption domain below
    elif scenario == "gradual":
        sigma_start = check_sigma(sigma_start, "sigma_start")
        sig = np.linspace(sigma_start, sigma, length) if length > 1 else sig
        params["sigma_start"] = sigma_start
    elif scenario == "mixed":
        levels = check_unique([check_sigma(s, "sigmas") for s in sigmas], "sigmas")
        sig = np.asarray(levels, dtype=np.float64)[rng.integers(0, len(levels), size=length)]
        params = {"sigmas": levels}
    elif scenario == "shift":
        sigma_start = check_sigma(sigma_start, "sigma_start")
        sig[: int(round(change_at * length))] = sigma_start
        params.update(sigma_start=sigma_start, change_at=change_at)
    if dom is None:
        return Stream(base, sig, labels, scenario, params, seed, run)
    cor, sev = _corruption_domain(scenario, dom, length, change_at, rng)
    params.update({k: v for k, v in dom.items() if v is not None})
    if scenario == "shift":
        params["change_at"] = change_at
    return Stream(base, sig, labels, scenario, params, seed, run, corruption=cor, severity=sev,
                  corruptions=tuple(dom["corruptions"]), source=corrupted)


def _corruption_domain(scenario: str, dom: dict, length: int, change_at: float, rng: np.random.Generator):
    """Per-position corruption index (-1 = clean) and severity (0 = clean) of ``scenario``."""
    k = len(dom["corruptions"])
    cor = np.zeros(length, dtype=np.int16)
    sev = np.full(length, dom["severity"], dtype=np.int8)
    if scenario == "gradual":
        a, b = dom["severity_start"], dom["severity"]
        levels = np.arange(a, b + 1) if b >= a else np.arange(a, b - 1, -1)
        sev = levels[(np.arange(length) * len(levels)) // length].astype(np.int8)
    elif scenario == "mixed":
        pairs = list(dict.fromkeys((c if s else -1, s) for c in range(k) for s in dom["severities"]))
        pick = rng.integers(0, len(pairs), size=length)
        cor = np.asarray([p[0] for p in pairs], dtype=np.int16)[pick]
        sev = np.asarray([p[1] for p in pairs], dtype=np.int8)[pick]
    elif scenario == "shift":
        cut = int(round(change_at * length))
        sev[:cut] = dom["severity_start"]
        cor[cut:] = k - 1
    cor[sev == 0] = -1
    return cor, sev


def _dirichlet_order(labels: np.ndarray, concentration: float, rng: np.random.Generator) -> np.ndarray:
    """RoTTA's label-Dirichlet temporal order (module docstring) as a permutation of positions."""
    classes = np.unique(labels)
    k = len(classes)
    slots: list[list[np.ndarray]] = [[] for _ in range(k)]
    props = rng.dirichlet([concentration] * k, size=k)
    for c, p in zip(classes, props):
        pos = np.flatnonzero(labels == c)
        pos = pos[rng.permutation(len(pos))]
        for s, part in enumerate(np.split(pos, (np.cumsum(p)[:-1] * len(pos)).astype(int))):
            if len(part):
                slots[s].append(part)
    out = [part for slot in slots for i in rng.permutation(len(slot)) for part in [slot[i]]]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def unit_noise(shape: tuple[int, ...], seed: int, run: int, start: int, stop: int) -> torch.Tensor:
    """Unit normal noise of stream positions ``[start, stop)``, shape ``(stop - start, *shape)``: drawn
    per block of :data:`NOISE_BLOCK` positions from ``(seed, run, NOISE_KEY, block)`` on the CPU, so a
    position's noise is the same whatever the batch size or device."""
    out = []
    for blk in range(start // NOISE_BLOCK, (stop - 1) // NOISE_BLOCK + 1):
        g = torch.Generator().manual_seed(derive_seed(seed, run, NOISE_KEY, blk))
        z = torch.randn((NOISE_BLOCK, *shape), generator=g)
        a, b = max(start - blk * NOISE_BLOCK, 0), min(stop - blk * NOISE_BLOCK, NOISE_BLOCK)
        out.append(z[a:b])
    return torch.cat(out) if len(out) > 1 else out[0]


def apply_domain(x: torch.Tensor, stream: Stream, start: int, stop: int, noise: torch.Tensor | None) -> torch.Tensor:
    """The images of positions ``[start, stop)`` after their domains. ``x`` holds their clean images
    (CPU); on a corrupted stream the rows of corrupted positions are replaced by the corrupted set's
    image of the same source image at that position's (corruption, severity) (those rows of ``x`` may
    hold anything); then ``x + sigma_t * z_t`` where sigma > 0 (``noise`` = the positions' unit noise)."""
    if stream.severity is not None:
        sev = stream.severity[start:stop]
        hit = sev > 0
        if hit.any():
            x = x.clone()
            cor = stream.corruption[start:stop]
            pos = stream.source.positions(stream.indices[start:stop])
            key = cor.astype(np.int64) * 6 + sev
            for k in np.unique(key[hit]):
                m = key == k
                x[torch.from_numpy(m)] = stream.source.images(stream.corruptions[int(k) // 6], int(k) % 6,
                                                              pos[m]).to(x.dtype)
    sig = stream.sigma[start:stop]
    if noise is None or not np.any(sig > 0):
        return x
    s = torch.as_tensor(sig, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return x + s * noise


def _clean_mask(stream: Stream, start: int, stop: int) -> np.ndarray | None:
    """Which positions of ``[start, stop)`` show a clean image (``None``: all of them)."""
    if stream.severity is None or not np.any(stream.severity[start:stop] > 0):
        return None
    return stream.severity[start:stop] == 0


def _assemble(dataset, stream: Stream, start: int, stop: int, read: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The slice's float32 images from the clean ones ``read`` (as stored), and its labels."""
    idx = stream.indices[start:stop]
    clean = _clean_mask(stream, start, stop)
    labels = dataset.labels[torch.from_numpy(np.asarray(idx, dtype=np.int64))]
    if clean is None:
        return to_float(read), labels
    x = torch.empty((len(idx), *dataset.image_shape), dtype=torch.float32)
    if clean.any():
        x[torch.from_numpy(clean)] = to_float(read)
    return x, labels


def _to_read(stream: Stream, start: int, stop: int) -> np.ndarray:
    idx = stream.indices[start:stop]
    clean = _clean_mask(stream, start, stop)
    return idx if clean is None else idx[clean]


def clean_images(dataset, stream: Stream, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean images (CPU) and labels of positions ``[start, stop)``: on a corrupted stream only the
    clean positions are read (the others are left uninitialised for :func:`apply_domain` to fill)."""
    return _assemble(dataset, stream, start, stop, raw(dataset, _to_read(stream, start, stop))[0])


class NoiseCache:
    """Sequential access to :func:`unit_noise` without redrawing a block per batch."""

    def __init__(self, shape: tuple[int, ...], seed: int, run: int):
        self.shape, self.seed, self.run = tuple(shape), seed, run
        self._blk, self._z = -1, None

    def get(self, start: int, stop: int) -> torch.Tensor:
        if start // NOISE_BLOCK == (stop - 1) // NOISE_BLOCK:
            blk = start // NOISE_BLOCK
            if blk != self._blk:
                self._blk, self._z = blk, unit_noise(self.shape, self.seed, self.run, blk * NOISE_BLOCK,
                                                     (blk + 1) * NOISE_BLOCK)
            return self._z[start - blk * NOISE_BLOCK: stop - blk * NOISE_BLOCK]
        return unit_noise(self.shape, self.seed, self.run, start, stop)


class _Sel:
    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, np.unique(indices)


def stream_batches(dataset, stream: Stream, slices, *, device: torch.device, noise: NoiseCache | None = None):
    """``(start, stop, x, y)`` for each slice of stream positions: images after their domains on
    ``device`` (channels_last for 4-D) and labels (CPU; None without labels). A corrupted stream must
    be read with the clean data its source is matched to (one-line error otherwise)."""
    from bnadapt.runs import to_device

    noise = noise or NoiseCache(dataset.image_shape, stream.seed, stream.run)
    noisy = bool(np.any(stream.sigma > 0))
    if stream.source is not None:
        stream.source.check_selection(_Sel(dataset, stream.indices))
    slices = list(slices)
    reads = batches(dataset, [_to_read(stream, sl.start, sl.stop) for sl in slices], pin=device.type == "cuda")
    for sl, (read, _) in zip(slices, reads):
        a, b = sl.start, sl.stop
        x, y = _assemble(dataset, stream, a, b, read)
        x = apply_domain(x, stream, a, b, noise.get(a, b) if noisy else None)
        yield a, b, to_device(x, device), (y if stream.labels is not None else None)
