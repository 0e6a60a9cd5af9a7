"""Generate corrupted copies of any data set bnadapt loads, in parallel, into a reusable cache.

Protocol (docs/corruptions.md):

- **Input to the library.** Each image as uint8 HxWx3: a gray image as three equal channels; an image
  under 32 px on a side (the library's minimum) reflect-padded to 32 (padding split evenly, the
  extra pixel at the bottom/right) and cropped back afterwards.
- **Spatter without liquid.** On small images the random liquid layer of spatter (severities 1-3)
  sometimes has no pixel above its threshold; the library then divides 0 by 0 and returns a black
  image. bnadapt returns the image unchanged instead (no liquid, no spatter).
- **Output.** A gray image keeps the first channel of the library's HxWx3 result (for the per-pixel
  noises that is one independent draw at the table's parameter; averaging channels would shrink the
  noise), an RGB image all three. uint8, the library's truncating cast.
- **Seeds.** Image ``i`` (its index in the source data set) under corruption ``c`` at severity ``s``
  is seeded with ``corruption_seed(seed, c, s, i)``: NumPy's global RNG is seeded with it before the
  call, and it is passed as ``seed=`` to the corruptions that take one (impulse_noise, glass_blur,
  which ignore the global seed). A set is therefore reproducible byte for byte and independent of the
  number of workers and of interruptions.
- **Engines.** ``library`` (imagecorruptions-imaug, ImageNet-C table, all 19 corruptions, CPU worker
  processes) or ``torch`` (:mod:`.torch_noise`: the noise family, either table, on ``device``).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from bnadapt.corruptions import cache
from bnadapt.corruptions.names import (LIBRARY, SEEDED_BY_LIBRARY, SEVERITIES, TORCH_NOISE, corruption_seed,
                                       describe_params, library_version, parse_corruptions, require_library,
                                       table_for)
from bnadapt.errors import BnadaptError, check, check_choice, check_count, check_seed
from bnadapt.runs import Progress, resolve_device

ENGINES = ("auto", "library", "torch")
# Relative cost per image of each corruption in the library (ms on this project's CPU, 28 px images padded
# to 32). Only the order matters: the expensive ones are scheduled first, so the workers finish together.
COST = {"frost": 5.2, "zoom_blur": 2.0, "glass_blur": 1.4, "motion_blur": 0.8, "snow": 0.75, "spatter": 0.6,
        "brightness": 0.5, "saturate": 0.5, "elastic_transform": 0.5, "fog": 0.5, "defocus_blur": 0.3,
        "jpeg_compression": 0.3, "gaussian_blur": 0.2, "shot_noise": 0.2, "impulse_noise": 0.2,
        "gaussian_noise": 0.2, "speckle_noise": 0.2, "contrast": 0.15, "pixelate": 0.1}
MIN_SIDE = 32
PROTOCOL = ("gray: 3 equal channels in, first channel out; sides under 32 px reflect-padded to 32 and cropped "
            "back; image i seeded with SeedSequence([seed, corruption index, severity, i]) -> uint32, used for "
            "np.random.seed and passed as seed= (impulse_noise, glass_blur); uint8 with the library's truncation")


# ----------------------------------------------------------------------------------------- one image
def library_input(images: np.ndarray) -> tuple[np.ndarray, tuple[int, int, bool]]:
    """Images (uint8 N x H x W[ x C]) as the library takes them: N x H' x W' x 3, gray repeated to three
    channels, sides under 32 px reflect-padded to 32; and what :func:`library_output` needs to undo it.
    Done once per image, not once per corruption and severity."""
    n, h, w = images.shape[:3]
    gray = images.ndim == 3 or images.shape[3] == 1
    x = images.reshape(n, h, w, -1)
    if gray:
        x = np.repeat(x, 3, axis=3)
    ph, pw = max(0, MIN_SIDE - h), max(0, MIN_SIDE - w)
    if ph or pw:
        x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), mode="reflect")
    return np.ascontiguousarray(x), (h, w, gray)


def _corrupt_prepared(lib, x: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """The library on one prepared image (H' x W' x 3) under the protocol (seeding, spatter guard)."""
    np.random.seed(seed)
    if corruption == "spatter":  # no liquid drawn (small images): the library divides 0 by 0 -> a black image
        with np.errstate(invalid="raise", divide="raise"):
            try:
                return np.asarray(lib.corrupt(x, severity=severity, corruption_name=corruption))
            except FloatingPointError:
                return x  # no spatter: the image unchanged
    kw = {"seed": seed} if corruption in SEEDED_BY_LIBRARY else {}
    return np.asarray(lib.corrupt(x, severity=severity, corruption_name=corruption, **kw))


def library_output(out: np.ndarray, shape: tuple[int, ...], info: tuple[int, int, bool]) -> np.ndarray:
    """The library's H' x W' x 3 result cropped back and reduced to the input's channels (the first one
    for gray input), uint8 with the library's truncation, in ``shape``."""
    h, w, gray = info
    H, W = out.shape[:2]
    top, left = (H - h) // 2, (W - w) // 2
    out = out[top:top + h, left:left + w]
    out = out[..., :1] if gray else out[..., :3]
    return np.ascontiguousarray(out.reshape(shape), dtype=np.uint8)


def corrupt_image(lib, image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """``image`` (uint8 HxW, HxWx1 or HxWx3) corrupted by the library under the protocol above;
    same shape and dtype as the input."""
    x, info = library_input(image[None])
    return library_output(_corrupt_prepared(lib, x[0], corruption, severity, seed), image.shape, info)


def corrupt_block(images: np.ndarray, corruption: str, severity: int, seed: int,
                  indices: Sequence[int], prepared: tuple[np.ndarray, tuple] | None = None) -> np.ndarray:
    """A block of images (uint8 N x H x W[ x C]) corrupted with the library, image ``k`` seeded by
    ``indices[k]`` (its index in the source). ``prepared``: :func:`library_input` of ``images``,
    when the caller has it already."""
    lib = require_library()
    x, info = prepared if prepared is not None else library_input(images)
    out = np.empty_like(images)
    for k, i in enumerate(indices):
        out[k] = library_output(_corrupt_prepared(lib, x[k], corruption, severity,
                                                  corruption_seed(seed, corruption, severity, i)), images.shape[1:], info)
    return out


def _init_worker() -> None:
    """Worker start: OpenCV single-threaded (the parallelism is across processes)."""
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover - require_library reports it
        pass


def _pool(workers: int):
    """``workers`` processes forked from a fork server that has imported the library and compiled
    glass_blur (:mod:`._preload`), or spawned where there is no fork server. Never plain fork: OpenCV's
    thread pool, once used by this process, deadlocks in a forked child. An executor, not a
    ``multiprocessing.Pool``: a worker that dies raises ``BrokenProcessPool`` here instead of being
    respawned forever (which hung a run whose main module the workers could not import)."""
    from concurrent.futures import ProcessPoolExecutor

    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["bnadapt.corruptions._preload"])
    else:  # pragma: no cover - not Linux
        ctx = mp.get_context("spawn")
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker)


def _task(args):
    corruption, severity, seed, start, indices, images, prepared = args
    t = time.process_time()
    out = corrupt_block(images, corruption, severity, seed, indices, prepared=prepared)
    return corruption, severity, start, out, time.process_time() - t


# ----------------------------------------------------------------------------------------- source
def source_images(sel) -> np.ndarray:
    """The selected images as uint8 N x H x W (gray) or N x H x W x 3 (RGB), in index order."""
    c, h, w = sel.image_shape
    check(c in (1, 3), f"{sel.dataset.name}: images have {c} channels; corruptions need gray (1) or RGB (3) images")
    out = np.empty((len(sel), h, w, c), dtype=np.uint8)
    for start in range(0, len(sel), 1024):
        x, _ = sel.dataset.get(sel.indices[start:start + 1024])
        out[start:start + len(x)] = np.rint(x.numpy().transpose(0, 2, 3, 1) * 255.0).astype(np.uint8)
    return out[..., 0] if c == 1 else out


def _identity(sel, params: str, engine: str, seed: int, dev: torch.device) -> dict:
    ident = {"params": describe_params(params), "engine": engine, "seed": seed, "images": len(sel),
             "image_shape": list(sel.image_shape), "protocol": PROTOCOL,
             "source": {k: v for k, v in sel.describe().items() if k != "spec"},
             "severities": list(SEVERITIES)}
    if engine == "library":
        ident["library"] = {"name": LIBRARY, "version": library_version()}
    else:
        ident["torch"] = {"version": torch.__version__.split("+")[0], "device_type": dev.type}
    return ident


# ----------------------------------------------------------------------------------------- generate
def generate(sel, out_dir: str | Path, *, corruptions: Sequence[str] | str | None = None, params: str = "imagenet",
             engine: str = "auto", seed: int = 0, workers: int = 2, device: str | torch.device | None = "cpu",
             block: int | None = None, quiet: bool = False) -> dict:
    """Corrupt the images of ``sel`` (a :class:`bnadapt.data.Selection`) with ``corruptions`` (names
    or sets; default all 19) at severities 1..5 into the cache folder ``out_dir``, and return a summary
    ``{"dir", "manifest", "generated", "reused", "wall_s", "corrupt_cpu_s", "main_cpu_s"}`` (CPU seconds
    spent corrupting, summed over workers, for the library engine; and in this process).

    Guarantees: a finished cache with the same identity is reused (nothing is recomputed; more
    corruptions can be added to it); an interrupted one is completed from its finished parts; a
    cache made for another request is a one-line error; the bytes do not depend on ``workers``,
    ``block`` or interruptions. ``workers`` library processes (0: in this process) run the library
    engine; the torch engine runs in this process on ``device``."""
    t0 = time.time()
    names = parse_corruptions(corruptions)
    engine = check_choice(engine, ENGINES, "engine")
    seed = check_seed(seed)
    workers = check_count(workers, "workers", min=0)
    if engine == "auto":
        engine = "library" if params == "imagenet" else "torch"
    table_for(params, names)  # unknown table, or cifar outside the noise family: one-line error
    if engine == "library":
        check(params == "imagenet", f"the library implements the imagenet table only; --params {params} needs "
                                    "--engine torch (noise family)")
        require_library()
    else:
        bad = [c for c in names if c not in TORCH_NOISE]
        check(not bad, f"the torch engine covers {', '.join(TORCH_NOISE)} only (not {', '.join(bad)}); "
                       "use --engine library for them")
    dev = resolve_device(device) if engine == "torch" else torch.device("cpu")
    folder = Path(out_dir).expanduser()
    check(not folder.is_file(), f"--out {folder} is a file; give a folder for the cache")
    identity = _identity(sel, params, engine, seed, dev)
    manifest = cache.read_manifest(folder) if folder.is_dir() else None
    if manifest is None:
        check(not folder.is_dir() or not any(folder.iterdir()),
              f"--out {folder} exists and is not a bnadapt corrupted-set cache; choose an empty or new folder")
        folder.mkdir(parents=True, exist_ok=True)
        manifest = cache.new_manifest(identity)
        manifest["source_spec"] = sel.spec
        manifest["class_names"] = list(sel.dataset.class_names)
    else:
        cache.check_identity(folder, manifest, identity)
    cache.remove_stale_temporaries(folder)
    images = source_images(sel)
    if manifest.get("labels") is None:
        labels = sel.dataset.labels[torch.from_numpy(sel.indices)].numpy()
        labels = labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.int64)
        sha = cache.save_npy(folder / "labels.npy", np.tile(labels, len(SEVERITIES)))
        manifest["labels"] = {"file": "labels.npy", "shape": [len(SEVERITIES) * len(labels)],
                              "dtype": str(labels.dtype), "sha256": sha}
    manifest["requested"] = [c for c in dict.fromkeys(list(manifest.get("requested", [])) + names)]
    manifest["complete"] = False
    cache.write_manifest(folder, manifest)

    shape = images.shape
    parts: dict[str, dict[int, np.ndarray]] = {}
    pending: list[tuple[str, int]] = []
    reused = []
    for c in names:
        if cache.finished(folder, manifest, c):
            reused += [(c, s) for s in SEVERITIES]
            continue
        parts[c] = {}
        for s in SEVERITIES:
            arr = cache.load_part(folder, c, s, shape)
            if arr is None:
                pending.append((c, s))
            else:
                parts[c][s] = arr
                reused.append((c, s))

    def finish(c: str, s: int, arr: np.ndarray) -> None:
        cache.save_part(folder, c, s, arr)
        parts[c][s] = arr
        if len(parts[c]) == len(SEVERITIES):
            manifest["corruptions"][c] = cache.assemble(folder, c, [parts[c][k] for k in SEVERITIES])
            del parts[c]
            cache.write_manifest(folder, manifest)

    n = len(images)
    corrupt_cpu_s, main_cpu0 = None, time.process_time()
    with Progress(n * len(pending), "corruptions", quiet=quiet) as bar:
        if engine == "torch":
            x = torch.from_numpy(images.reshape(n, *shape[1:3], -1)).permute(0, 3, 1, 2)
            from bnadapt.corruptions.torch_noise import noise_images

            for c, s in pending:
                out = noise_images(x, c, s, params=params, seed=seed, indices=sel.indices, device=dev)
                finish(c, s, out.permute(0, 2, 3, 1).cpu().numpy().reshape(shape))
                bar.update(n)
        else:
            corrupt_cpu_s = _run_library(images, sel.indices, pending, seed, workers, block, finish, bar)
    manifest["complete"] = all(cache.finished(folder, manifest, c) for c in manifest["requested"])
    cache.write_manifest(folder, manifest)
    cache.clean_parts_dir(folder)
    return {"dir": str(folder), "manifest": manifest, "generated": pending, "reused": reused,
            "wall_s": time.time() - t0, "corrupt_cpu_s": corrupt_cpu_s, "main_cpu_s": time.process_time() - main_cpu0}


def _run_library(images: np.ndarray, indices: np.ndarray, pending, seed: int, workers: int, block: int | None,
                 finish, bar: Progress) -> float:
    """Run the library over ``pending`` (corruption, severity) pairs in blocks of images, in
    ``workers`` processes (0: here); ``finish(c, s, array)`` receives each completed pair in turn.
    Returns the CPU seconds spent corrupting (summed over workers)."""
    cpu_s = [0.0]
    n = len(images)
    if block is None:  # the (corruption, severity) pairs already give the workers plenty to share
        block = max(1, min(256, n if len(pending) >= 4 * max(1, workers) else -(-n // (4 * max(1, workers)))))
    prepared, info = library_input(images)  # once per image, shared by every corruption and severity
    order = sorted(pending, key=lambda cs: (-COST.get(cs[0], 1.0), -cs[1]))  # longest first: no lonely tail
    tasks = [(c, s, seed, a, indices[a:a + block], images[a:a + block], (prepared[a:a + block], info))
             for c, s in order for a in range(0, n, block)]
    todo = {(c, s): -(-n // block) for c, s in pending}
    got: dict[tuple[str, int], dict[int, np.ndarray]] = {key: {} for key in todo}

    def collect(result) -> None:
        c, s, start, arr, cpu = result
        cpu_s[0] += cpu
        got[(c, s)][start] = arr
        bar.update(len(arr))
        if len(got[(c, s)]) == todo[(c, s)]:
            pieces = got.pop((c, s))
            finish(c, s, np.concatenate([pieces[k] for k in sorted(pieces)], axis=0))

    if workers == 0 or not tasks:
        for t in tasks:
            collect(_task(t))
        return cpu_s[0]
    from concurrent.futures import FIRST_COMPLETED, wait
    from concurrent.futures.process import BrokenProcessPool

    pool = _pool(workers)
    try:
        waiting, queue = set(), iter(tasks)
        for t in queue:  # keep at most 8 tasks per worker in flight (bounded memory; workers never wait on our I/O)
            waiting.add(pool.submit(_task, t))
            if len(waiting) >= 8 * workers:
                break
        while waiting:
            done, waiting = wait(waiting, return_when=FIRST_COMPLETED)
            for fut in done:
                collect(fut.result())
                nxt = next(queue, None)
                if nxt is not None:
                    waiting.add(pool.submit(_task, nxt))
    except BrokenProcessPool as e:
        raise BnadaptError(f"the corruption worker processes died ({e}); run from a script whose top level is "
                           "guarded by `if __name__ == \"__main__\":` (workers import the main module), or pass "
                           "--workers 0 to generate in this process") from e
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return cpu_s[0]
