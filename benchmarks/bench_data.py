"""The data pipeline at ImageNet shapes: 500x375 JPEGs (the typical ImageNet validation image) decoded to
224 px tensors (resize 256, center crop 224), in worker processes and from a decoded cache.

Figures (medians of ``--repeats`` passes; side by side with the issue's reference and target):

- ``decode_per_worker_img_s``: one decoding worker (the old loader, decoding in the main process, was
  measured at 244 img/s by the issue);
- ``workers2_over_1``: throughput with 2 workers over 1 (target >= 1.8 on a 2-core machine);
- ``cached_pass_img_s``: a pass over the decoded cache in shuffled order (target >= 20,000);
- ``data_wait_share``: share of a ``noise``-style accuracy run's wall time spent waiting for batches,
  small model, cached (target <= 0.10); ``data_wait_share_uncached_2_workers`` beside it;
- ``peak_rss_mb``: the peak memory of a shuffled pass over the folder (own process or any worker) with
  2 workers and from the cache, beside ``float32_mb``, the set's size as float32 (what holding it would take).

Run (about 2 minutes; keep the machine otherwise idle): ``.venv/bin/python benchmarks/bench_data.py``
Options: ``--images N`` (default 600), ``--repeats R`` (default 3). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bnadapt.data import load_image_folder  # noqa: E402
from bnadapt.data.pipeline import WaitClock, batches, using  # noqa: E402

OLD_DECODE_IMG_S = 244.0  # the measurement of the main-process loader (one process)
BATCH = 64


def make_folder(root: Path, n: int, classes: int = 10, seed: int = 0) -> Path:
    """``n`` photo-like 500x375 JPEGs (smooth colour fields plus texture, quality 90) in ``classes`` folders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / f"class{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        base = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
        arr = np.asarray(base, dtype=np.int16) + rng.integers(-20, 21, (375, 500, 3))
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(d / f"{i:05d}.jpg", quality=90)
    return root


def _chunks(n: int, seed: int = 0) -> list[np.ndarray]:
    idx = np.random.default_rng(seed).permutation(n)
    return [idx[a:a + BATCH] for a in range(0, n, BATCH)]


def pass_rate(ds, workers: int) -> float:
    chunks = _chunks(len(ds))
    t = time.perf_counter()
    n = sum(len(y) for _, y in batches(ds, chunks, workers=workers))
    return n / (time.perf_counter() - t)


def wait_share(ds, model) -> float:
    from bnadapt.noise import accuracy

    clock = WaitClock()
    t = time.perf_counter()
    accuracy(model, ds, sigma=0.25, rho=1.0, batch_size=BATCH, seed=0, clock=clock)
    return clock.seconds / (time.perf_counter() - t)


PEAK = """
import os, sys, threading, time, numpy as np
from bnadapt.data import load_image_folder
from bnadapt.data.pipeline import batches, using

def status_kb(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(l.split()[1]) for l in f if l.startswith(key)), 0)
    except OSError:
        return 0

def children():
    out = []
    for t in os.listdir("/proc/self/task"):
        try:
            out += open(f"/proc/self/task/{t}/children").read().split()
        except OSError:
            pass
    return out

peak, stop = [0], threading.Event()
def sample():  # the decoding workers' memory (their own peaks are lost when they exit)
    while not stop.is_set():
        peak[0] = max([peak[0]] + [status_kb(k, "VmRSS:") for k in children()])
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
size = None if sys.argv[4] == "auto" else int(sys.argv[4])
ds = load_image_folder(sys.argv[1], resize=size or "auto", crop=size or "auto")
idx = np.random.default_rng(0).permutation(len(ds))
with using(workers=int(sys.argv[2]), cache=None if sys.argv[3] == "-" else sys.argv[3]):
    n = sum(len(y) for _, y in batches(ds, [idx[a:a + 16] for a in range(0, len(idx), 16)]))
assert n == len(ds)
stop.set()
print(max(peak[0], status_kb("self", "VmHWM:")) / 1024)
"""


def peak_rss_mb(folder: Path, workers: int, cache: str | Path = "-", size: int | None = None) -> float:
    """Peak resident memory (MB) of a shuffled pass over ``folder`` in a fresh process: that process's
    high-water mark or any decoding worker's sampled resident size, whichever is larger (``ru_maxrss``
    would report the parent's memory: it survives fork and exec)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", PEAK, str(folder), str(workers), str(cache),
                          "auto" if size is None else str(size)], capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_data."))
    try:
        folder = make_folder(tmp / "val", a.images)
        ds = load_image_folder(folder)
        assert ds.image_shape == (3, 224, 224)
        one, two = [], []
        for _ in range(a.repeats):  # alternated, so a load change hits both
            one.append(pass_rate(ds, 1))
            two.append(pass_rate(ds, 2))
        ratios = sorted(t / o for t, o in zip(two, one))
        cache = tmp / "cache"
        with using(workers=2, cache=cache):
            t = time.perf_counter()
            ds.get([0])  # builds the cache (2 workers)
            build_s = time.perf_counter() - t
            cached = [pass_rate(ds, 0) for _ in range(a.repeats)]
        from bnadapt.models import PreActResNet

        torch.manual_seed(0)
        model = PreActResNet(in_channels=3, num_classes=10, widths=(16, 32, 64), stem_stride=2).eval()
        with using(workers=2, cache=cache):
            share_cached = [wait_share(ds, model) for _ in range(a.repeats)]
        with using(workers=2):
            share_uncached = [wait_share(ds, model) for _ in range(a.repeats)]
        float32_mb = a.images * 3 * 224 * 224 * 4 / 2**20
        rss_workers = peak_rss_mb(folder, 2, "-")
        rss_cached = peak_rss_mb(folder, 0, cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med = statistics.median
    fig = {
        "images": a.images, "repeats": a.repeats, "image": "500x375 JPEG q90 -> resize 256, crop 224",
        "decode_per_worker_img_s": round(med(one), 1), "old_main_process_img_s": OLD_DECODE_IMG_S,
        "decode_per_worker_over_old": round(med(one) / OLD_DECODE_IMG_S, 2),
        "workers2_img_s": round(med(two), 1), "workers2_over_1": round(med(ratios), 3), "workers2_over_1_target": 1.8,
        "cache_build_s": round(build_s, 2), "cached_pass_img_s": round(med(cached), 0), "cached_pass_target": 20000,
        "data_wait_share": round(med(share_cached), 4), "data_wait_share_target": 0.10,
        "data_wait_share_uncached_2_workers": round(med(share_uncached), 4),
        "peak_rss_mb": round(max(rss_workers, rss_cached), 1), "peak_rss_mb_2_workers": round(rss_workers, 1),
        "peak_rss_mb_cached": round(rss_cached, 1), "float32_mb": round(float32_mb, 1),
    }
    print(f"decode, one worker : {fig['decode_per_worker_img_s']:8.1f} img/s   (old loader {OLD_DECODE_IMG_S:.0f}: "
          f"{fig['decode_per_worker_over_old']:.2f}x)")
    print(f"decode, 2 workers  : {fig['workers2_img_s']:8.1f} img/s   2 over 1 = {fig['workers2_over_1']:.3f} "
          f"(target >= 1.8; per-repeat {', '.join(f'{r:.2f}' for r in ratios)})")
    print(f"cache build        : {fig['cache_build_s']:8.2f} s      ({a.images} images, 2 workers)")
    print(f"cached pass        : {fig['cached_pass_img_s']:8.0f} img/s   (target >= 20,000: "
          f"{fig['cached_pass_img_s'] / 20000:.2f}x)")
    print(f"data wait, cached  : {fig['data_wait_share']:8.4f}         (target <= 0.10); uncached, 2 workers: "
          f"{fig['data_wait_share_uncached_2_workers']:.4f}")
    print(f"peak RSS           : {fig['peak_rss_mb_2_workers']:.1f} MB with 2 workers, {fig['peak_rss_mb_cached']:.1f} MB "
          f"cached; the set as float32 is {fig['float32_mb']:.1f} MB")
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
