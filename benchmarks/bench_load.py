"""Load time of the Fashion-MNIST test set (10,000 images) from the Debian package files, cold
(per-process cache cleared) — median of repeated loads. Target (issue 2): under 1 s.
Last line: {"fashion_mnist_test_load_s": <median seconds>, ...}
"""

from __future__ import annotations

import json
import statistics
import time

from bnadapt.data import fashion_mnist


def main(repeats: int = 7) -> None:
    times = []
    for _ in range(repeats):
        fashion_mnist.clear_cache()
        t = time.perf_counter()
        ds = fashion_mnist.load_fashion_mnist("test")
        x, y = ds.get(range(len(ds)))  # also decode all images to float tensors
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    print(f"Fashion-MNIST test set: {len(ds)} images {tuple(x.shape[1:])}, cold load + decode to float: "
          f"median {med:.3f} s over {repeats} (min {min(times):.3f}, max {max(times):.3f}); target < 1 s, "
          f"ratio to target {med / 1.0:.3f}")
    print(json.dumps({"fashion_mnist_test_load_s": round(med, 4), "target_s": 1.0, "ratio_to_target": round(med, 4)}))


if __name__ == "__main__":
    main()
