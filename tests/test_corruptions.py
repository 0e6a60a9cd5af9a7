"""Corruptions: reproducible generation, shapes, the cache, the torch noise path, metrics, readers."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bnadapt.corruptions import cache, names
from bnadapt.corruptions.metrics import (ALEXNET_CLEAN_ERROR, ALEXNET_ERRORS, aggregate, alexnet_reference,
                                         reference_from_accuracies, summarize)
from bnadapt.data import TensorImageDataset, load_dataset, select
from bnadapt.errors import BnadaptError

lib_missing = names.library_version() is None
needs_lib = pytest.mark.skipif(lib_missing, reason="imagecorruptions-imaug not installed (bash scripts/setup.sh)")


def tiny_selection(n=4, hw=28, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.integers(0, 256, size=(n, channels, hw, hw), dtype=np.uint8))
    y = torch.arange(n) % 3
    ds = TensorImageDataset(x, y, name=f"tiny{hw}x{channels}")
    return select("tiny", None, dataset=ds)


def gradient_image(hw=32):
    """An RGB image whose pixels cover 0..255 (every intensity, every channel)."""
    v = (np.arange(hw * hw * 3) * 255 // (hw * hw * 3 - 1)).astype(np.uint8)
    return np.random.default_rng(0).permutation(v).reshape(hw, hw, 3)


# ----------------------------------------------------------------------------------------- names
def test_names_groups_and_seeds():
    assert len(names.COMMON) == 15 and len(names.ALL) == 19 and names.HOLD_OUT == (
        "speckle_noise", "gaussian_blur", "spatter", "saturate")
    assert sum(len(g) for g in names.GROUPS.values()) == 19
    assert names.parse_corruptions("hold-out,gaussian_noise") == ["gaussian_noise", *names.HOLD_OUT]
    assert names.parse_corruptions("common") == list(names.COMMON)
    s = names.corruption_seed(0, "glass_blur", 3, 17)
    assert s == names.corruption_seed(0, "glass_blur", 3, 17) and 0 <= s < 2 ** 32
    keys = {names.corruption_seed(a, c, v, i) for a in (0, 1) for c in ("glass_blur", "impulse_noise")
            for v in (1, 2) for i in (0, 1)}
    assert len(keys) == 16
    for bad in ("fog,snowstorm", ""):
        with pytest.raises(BnadaptError):
            names.parse_corruptions(bad)
    for bad in (0, 6, 2.5):
        with pytest.raises(BnadaptError, match="1 to 5"):
            names.check_severity(bad)
    with pytest.raises(BnadaptError, match="parameter table"):
        names.check_params("tiny")
    with pytest.raises(BnadaptError, match="noise"):
        names.table_for("cifar", ["fog"])


def test_cifar_table_is_make_cifar_c():
    assert names.CIFAR_NOISE_TABLE == {"gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],
                                       "shot_noise": [500, 250, 100, 75, 50],
                                       "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],
                                       "speckle_noise": [0.06, 0.1, 0.12, 0.16, 0.2]}
    assert names.IMAGENET_TABLE["gaussian_noise"] == [0.08, 0.12, 0.18, 0.26, 0.38]


# ----------------------------------------------------------------------------------------- generation
@needs_lib
def test_same_seed_same_bytes_glass_blur_impulse():
    from bnadapt.corruptions.generate import corrupt_block

    imgs = tiny_selection(3, 28).dataset.images[:, 0].numpy()
    for c in ("glass_blur", "impulse_noise", "frost", "gaussian_noise"):
        a = corrupt_block(imgs, c, 3, seed=5, indices=[0, 1, 2])
        np.random.seed(123)  # the global state does not matter: every image is seeded
        b = corrupt_block(imgs, c, 3, seed=5, indices=[0, 1, 2])
        assert np.array_equal(a, b), c
        assert not np.array_equal(a, corrupt_block(imgs, c, 3, seed=6, indices=[0, 1, 2])), c
        # an image's corruption depends on its index, not on its block
        assert np.array_equal(a[1:2], corrupt_block(imgs[1:2], c, 3, seed=5, indices=[1])), c


@needs_lib
@pytest.mark.parametrize("shape", [(28, 28), (28, 28, 1), (32, 32, 3)])
def test_shapes_and_dtypes(shape):
    from bnadapt.corruptions.generate import corrupt_image

    lib = names.require_library()
    img = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
    for c in names.ALL:
        out = corrupt_image(lib, img, c, 5, seed=3)
        assert out.shape == shape and out.dtype == np.uint8, c
    # padding is cropped back: a mild corruption keeps a 28 px gray image close to itself
    if shape[0] == 28:
        out = corrupt_image(lib, img, "contrast", 1, seed=0).astype(float)
        assert np.corrcoef(out.ravel(), img.astype(float).ravel())[0, 1] > 0.99


@needs_lib
def test_generate_reproducible_across_workers_and_reused(tmp_path):
    from bnadapt.corruptions.generate import generate

    sel = tiny_selection(5, 28)
    kw = dict(corruptions="glass_blur,impulse_noise,contrast", quiet=True)
    a = generate(sel, tmp_path / "a", workers=0, block=2, **kw)
    b = generate(sel, tmp_path / "b", workers=2, **kw)
    for c in ("glass_blur", "impulse_noise", "contrast"):
        x, y = np.load(tmp_path / "a" / f"{c}.npy"), np.load(tmp_path / "b" / f"{c}.npy")
        assert x.shape == (25, 28, 28) and x.dtype == np.uint8 and np.array_equal(x, y)
        assert a["manifest"]["corruptions"][c]["sha256"] == b["manifest"]["corruptions"][c]["sha256"]
    labels = np.load(tmp_path / "a" / "labels.npy")
    assert labels.shape == (25,) and np.array_equal(labels[:5], sel.dataset.labels.numpy())
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    ident = m["identity"]
    assert m["complete"] and ident["library"] == {"name": "imagecorruptions-imaug", "version": "1.1.5"}
    assert ident["params"]["name"] == "imagenet" and ident["seed"] == 0 and ident["images"] == 5
    assert ident["source"]["content_sha256"] == sel.describe()["content_sha256"]
    # reuse: nothing recomputed, files untouched
    stamp = (tmp_path / "a" / "contrast.npy").stat().st_mtime_ns
    again = generate(sel, tmp_path / "a", workers=0, **kw)
    assert again["generated"] == [] and len(again["reused"]) == 15
    assert (tmp_path / "a" / "contrast.npy").stat().st_mtime_ns == stamp
    # a request that does not match the manifest is a one-line error
    for bad in (dict(seed=1), dict(corruptions="contrast", params="cifar")):
        with pytest.raises(BnadaptError) as e:
            generate(sel, tmp_path / "a", workers=0, quiet=True, **{"corruptions": "contrast", **bad})
        assert "\n" not in str(e.value)
    with pytest.raises(BnadaptError, match="seed"):
        generate(sel, tmp_path / "a", workers=0, quiet=True, corruptions="contrast", seed=1)


@needs_lib
def test_workers_that_cannot_start_are_an_error_not_a_hang(tmp_path, monkeypatch):
    """Workers import the main module; when they cannot (a script read from stdin, or one without a
    __main__ guard that fails in the child) they die at start. multiprocessing.Pool respawned them
    forever (a silent hang); generation must stop with a one-line error instead."""
    import sys
    import types

    from bnadapt.corruptions.generate import generate

    fake_main = types.ModuleType("__main__")
    fake_main.__file__ = str(tmp_path / "no_such_script.py")
    monkeypatch.setitem(sys.modules, "__main__", fake_main)
    with pytest.raises(BnadaptError, match="worker processes died") as e:
        generate(tiny_selection(2, 28), tmp_path / "c", corruptions="contrast", workers=2, quiet=True)
    assert "\n" not in str(e.value)


@needs_lib
def test_interrupted_cache_is_completed_never_used_half_written(tmp_path, monkeypatch):
    from bnadapt.corruptions import generate as gen
    from bnadapt.data.corrupted import CorruptedSet

    sel = tiny_selection(4, 32, channels=3)
    full = gen.generate(sel, tmp_path / "full", corruptions="impulse_noise,glass_blur", workers=0, quiet=True)
    real_save, calls = cache.save_part, []

    def interrupting(folder, c, s, arr):
        if len(calls) == 7:  # one corruption finished (5 parts), the other at its 3rd severity
            raise KeyboardInterrupt
        calls.append((c, s))
        real_save(folder, c, s, arr)

    monkeypatch.setattr(cache, "save_part", interrupting)
    with pytest.raises(KeyboardInterrupt):
        gen.generate(sel, tmp_path / "x", corruptions="impulse_noise,glass_blur", workers=0, quiet=True)
    first = calls[0][0]
    second = ({"impulse_noise", "glass_blur"} - {first}).pop()
    assert (tmp_path / "x" / f"{first}.npy").is_file() and not (tmp_path / "x" / f"{second}.npy").exists()
    assert CorruptedSet(tmp_path / "x").available == [first]  # the half-made corruption is invisible
    monkeypatch.setattr(cache, "save_part", real_save)
    done = []
    real_block = gen.corrupt_block
    monkeypatch.setattr(gen, "corrupt_block", lambda im, c, s, *a, **k: done.append((c, s)) or real_block(im, c, s, *a, **k))
    res = gen.generate(sel, tmp_path / "x", corruptions="impulse_noise,glass_blur", workers=0, quiet=True)
    finished = {cs for cs in calls if cs[0] == second}
    assert len(finished) == 2 and sorted(set(done)) == sorted({(second, s) for s in (1, 2, 3, 4, 5)} - finished)
    assert res["manifest"]["complete"]
    for c in ("impulse_noise", "glass_blur"):
        assert np.array_equal(np.load(tmp_path / "x" / f"{c}.npy"), np.load(tmp_path / "full" / f"{c}.npy"))
        assert np.load(tmp_path / "x" / f"{c}.npy").shape == (20, 32, 32, 3)
    assert full["manifest"]["corruptions"] == res["manifest"]["corruptions"]
    assert not (tmp_path / "x" / ".parts").exists()


def test_foreign_folder_and_missing_library(tmp_path, monkeypatch):
    from bnadapt.corruptions.generate import generate

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    sel = tiny_selection(2, 28)
    with pytest.raises(BnadaptError, match="not a bnadapt corrupted-set cache"):
        generate(sel, tmp_path / "busy", corruptions="gaussian_noise", engine="torch", quiet=True)
    monkeypatch.setattr(names, "library_version", lambda: None)
    with pytest.raises(BnadaptError) as e:
        generate(sel, tmp_path / "c", corruptions="fog", quiet=True)
    msg = str(e.value)
    assert "\n" not in msg and "pip install" in msg and "--no-deps imagecorruptions-imaug==1.1.5" in msg
    assert not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------------------- torch noise
def _stats_close(a: np.ndarray, b: np.ndarray, x: np.ndarray, what: str) -> None:
    """Equal in distribution, as far as K draws can tell: per-intensity-bin means and variances
    within 5 standard errors, the same share of saturated pixels, and a chi-square test of histograms."""
    from scipy.stats import chi2_contingency

    a, b = a.astype(float).ravel(), b.astype(float).ravel()
    xr = np.broadcast_to(x, (len(a) // x.size, *x.shape)).astype(float).ravel()
    for lo in range(0, 256, 32):
        m = (xr >= lo) & (xr < lo + 32)
        da, db = a[m] - xr[m], b[m] - xr[m]
        se = np.sqrt(da.var() / m.sum() + db.var() / m.sum()) + 1e-9
        assert abs(da.mean() - db.mean()) < 5 * se + 0.05, (what, lo, da.mean(), db.mean())
        qa, qb = (da - da.mean()) ** 2, (db - db.mean()) ** 2  # variances within 5 standard errors
        se_var = np.sqrt(qa.var() / m.sum() + qb.var() / m.sum()) + 1e-9
        assert abs(qa.mean() - qb.mean()) < 5 * se_var + 0.5, (what, lo, da.std(), db.std())
    for v in (0, 255):
        pa, pb = (a == v).mean(), (b == v).mean()
        assert abs(pa - pb) < 5 * np.sqrt(pa * (1 - pa) / len(a) * 2) + 1e-3, (what, v, pa, pb)
    ha, hb = np.histogram(a, bins=32, range=(0, 256))[0], np.histogram(b, bins=32, range=(0, 256))[0]
    keep = (ha + hb) > 0
    assert chi2_contingency(np.stack([ha[keep], hb[keep]]))[1] > 1e-4, what


@needs_lib
@pytest.mark.parametrize("corruption", names.TORCH_NOISE)
def test_torch_noise_equal_in_distribution_to_library(corruption):
    from bnadapt.corruptions.generate import corrupt_image
    from bnadapt.corruptions.torch_noise import noise_images

    lib = names.require_library()
    img = gradient_image()
    k = 12
    for sev in (1, 3, 5):
        ref = np.stack([corrupt_image(lib, img, corruption, sev, seed=1000 + i) for i in range(k)])
        x = torch.from_numpy(img).permute(2, 0, 1)[None].repeat(k, 1, 1, 1)
        mine = noise_images(x, corruption, sev, params="imagenet", seed=7).permute(0, 2, 3, 1).numpy()
        assert mine.dtype == np.uint8 and mine.shape == ref.shape
        _stats_close(ref, mine, img, f"{corruption} severity {sev}")


def test_torch_noise_cifar_table_and_reproducibility():
    from bnadapt.corruptions.torch_noise import noise_images

    x = torch.full((8, 3, 32, 32), 128, dtype=torch.uint8)
    u = 128 / 255
    cases = {("gaussian_noise", 1): 0.04, ("gaussian_noise", 5): 0.10, ("speckle_noise", 3): u * 0.12,
             ("shot_noise", 5): np.sqrt(u / 50), ("shot_noise", 1): np.sqrt(u / 500)}
    for (c, s), sd in cases.items():
        out = noise_images(x, c, s, params="cifar").double() / 255
        assert out.std().item() == pytest.approx(sd, rel=0.08, abs=0.003), (c, s)
        assert out.mean().item() == pytest.approx(u, abs=0.01), (c, s)
    out = noise_images(x, "impulse_noise", 5, params="cifar")
    flipped = ((out == 0) | (out == 255)).double().mean().item()
    assert flipped == pytest.approx(0.07, abs=0.01) and (out == 0).sum() > 0 and (out == 255).sum() > 0
    assert ((out == 128) | (out == 127) | (out == 0) | (out == 255)).all()
    # the ImageNet table is stronger at the same severity
    wide = (noise_images(x, "gaussian_noise", 1, params="imagenet").double() / 255).std().item()
    assert wide == pytest.approx(0.08, rel=0.08)
    # reproducible per image, whatever the batch
    a = noise_images(x[:4], "shot_noise", 2, params="cifar", seed=3, indices=[10, 11, 12, 13])
    b = noise_images(x[:1], "shot_noise", 2, params="cifar", seed=3, indices=[12])
    assert torch.equal(a[2:3], b)
    with pytest.raises(BnadaptError):
        noise_images(x, "fog", 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_noise_on_cuda_matches_cpu_in_distribution():
    from bnadapt.corruptions.torch_noise import noise_images

    img = gradient_image()
    x = torch.from_numpy(img).permute(2, 0, 1)[None].repeat(12, 1, 1, 1)
    for c in names.TORCH_NOISE:
        a = noise_images(x, c, 4, device="cpu").permute(0, 2, 3, 1).numpy()
        g = noise_images(x, c, 4, device="cuda")
        assert g.device.type == "cuda"
        _stats_close(a, g.cpu().permute(0, 2, 3, 1).numpy(), img, c)


def test_generate_torch_engine_cifar(tmp_path):
    from bnadapt.corruptions.generate import generate

    sel = tiny_selection(3, 28)
    res = generate(sel, tmp_path / "t", corruptions="noise,speckle_noise", params="cifar", quiet=True)
    assert res["manifest"]["identity"]["engine"] == "torch" and res["manifest"]["identity"]["params"]["name"] == "cifar"
    arr = np.load(tmp_path / "t" / "speckle_noise.npy")
    assert arr.shape == (15, 28, 28) and arr.dtype == np.uint8
    ds = load_dataset(f"cifar10-c:{tmp_path / 't'}:shot_noise:5")
    assert ds.image_shape == (1, 28, 28) and len(ds) == 3


# ----------------------------------------------------------------------------------------- metrics
def test_mce_and_relative_mce_hand_computed():
    ref = {"name": "ref", "clean_error": 0.4, "errors": {c: 0.8 for c in names.COMMON}}
    ref["errors"]["gaussian_noise"] = 0.9
    accs = {c: [0.6] * 5 for c in names.COMMON}
    accs["gaussian_noise"] = [0.5, 0.4, 0.3, 0.2, 0.1]
    m = summarize(0.9, accs, ref)
    assert m["corrupt"] == pytest.approx((14 * 0.6 + 0.3) / 15) and m["gap"] == pytest.approx(0.9 - 8.7 / 15)
    assert m["ce"]["fog"] == pytest.approx(0.5) and m["ce"]["gaussian_noise"] == pytest.approx(0.7 / 0.9)
    assert m["mce"] == pytest.approx((14 * 0.5 + 0.7 / 0.9) / 15)
    assert m["relative_ce"]["fog"] == pytest.approx(0.75) and m["relative_ce"]["gaussian_noise"] == pytest.approx(1.2)
    assert m["relative_mce"] == pytest.approx((14 * 0.75 + 1.2) / 15) == pytest.approx(0.78)
    # a per-severity reference gives the same numbers (ratios of sums = ratios of means)
    per = {c: [1 - e] * 5 for c, e in ref["errors"].items()}
    per["gaussian_noise"] = [0.3, 0.1, 0.1, 0.0, 0.0]  # mean error 0.9
    m2 = summarize(0.9, accs, reference_from_accuracies("ref", 0.6, per, "test"))
    assert m2["mce"] == pytest.approx(m["mce"]) and m2["relative_mce"] == pytest.approx(m["relative_mce"])
    # missing corruptions leave mCE undefined; a non-positive reference denominator is left out
    assert summarize(0.9, {"fog": [0.5] * 5}, ref)["mce"] is None
    ref["errors"]["brightness"] = 0.3
    m3 = summarize(0.9, accs, ref)
    assert m3["relative_excluded"] == ["brightness"] and m3["relative_mce"] == pytest.approx((13 * 0.75 + 1.2) / 14)
    # aggregate over runs: mean and 2 sample sd
    agg = aggregate([summarize(0.9, accs, ref), summarize(0.8, accs, ref)])
    assert agg["clean"]["mean"] == pytest.approx(0.85) and agg["clean"]["two_sd"] == pytest.approx(2 * np.std([0.9, 0.8], ddof=1))


def test_alexnet_reference_carried_with_source():
    a = alexnet_reference()
    assert a["clean_error"] == ALEXNET_CLEAN_ERROR and set(a["errors"]) == set(names.ALL) and "Hendrycks" in a["source"]
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "imagenet_c_alexnet_errors.json"
    if not shared.is_file():
        shared = Path("/work/shared/reference/imagenet_c_alexnet_errors.json")
    if shared.is_file():
        j = json.loads(shared.read_text())
        assert j["clean"] == ALEXNET_CLEAN_ERROR and {**j["corruptions"], **j["hold_out"]} == ALEXNET_ERRORS
        assert {k.replace("_", "-"): tuple(v) for k, v in j["groups"].items()} == names.GROUPS
    # AlexNet's own mCE is 100 by construction
    accs = {c: [1 - ALEXNET_ERRORS[c]] * 5 for c in names.COMMON}
    m = summarize(1 - ALEXNET_CLEAN_ERROR, accs, a)
    assert m["mce"] == pytest.approx(1.0) and m["relative_mce"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------- readers
def fabricate_cifar10c(folder: Path, n=4, hw=32, corruptions=("gaussian_noise", "fog"), labels_once=False):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for c in corruptions:
        arrays[c] = rng.integers(0, 256, size=(5 * n, hw, hw, 3), dtype=np.uint8)
        np.save(folder / f"{c}.npy", arrays[c])
    y = (np.arange(n) % 2).astype(np.uint8)
    np.save(folder / "labels.npy", y if labels_once else np.tile(y, 5))
    return arrays, y


def test_cifar10c_reader(tmp_path):
    from bnadapt.data.corrupted import CorruptedSet

    arrays, y = fabricate_cifar10c(tmp_path / "c10c")
    ds = load_dataset(f"cifar10-c:{tmp_path / 'c10c'}:fog:3")
    x, lab = ds.get(np.arange(4))
    assert x.shape == (4, 3, 32, 32) and torch.equal(lab, torch.from_numpy(y.astype(np.int64)))
    expect = torch.from_numpy(arrays["fog"][8:12].transpose(0, 3, 1, 2).astype(np.float32) / 255)
    assert torch.allclose(x, expect)
    cs = CorruptedSet(tmp_path / "c10c")
    assert cs.available == ["gaussian_noise", "fog"] and cs.n == 4 and cs.manifest is None and cs.params is None
    fabricate_cifar10c(tmp_path / "once", labels_once=True)
    assert CorruptedSet(tmp_path / "once").n == 4
    sel = select(f"cifar10-c:{tmp_path / 'c10c'}:gaussian_noise:1", None, images=2)
    assert len(sel) == 2 and sel.describe()["name"].endswith("gaussian_noise/1")


def test_cifar10c_reader_bad_input(tmp_path):
    fabricate_cifar10c(tmp_path / "ok")
    root = tmp_path / "ok"
    cases = [
        (f"cifar10-c:{root}:fog:6", "1 to 5"),
        (f"cifar10-c:{root}:fogg:2", "unknown corruption"),
        (f"cifar10-c:{root}:fog", "no severity"),
        (f"cifar10-c:{root}", "whole corrupted set"),
        (f"cifar10-c:{root}:snow:1", "no snow"),
        (f"cifar10-c:{tmp_path / 'nowhere'}:fog:1", "not found"),
    ]
    (tmp_path / "nolabels").mkdir()
    np.save(tmp_path / "nolabels" / "fog.npy", np.zeros((10, 32, 32, 3), np.uint8))
    cases.append((f"cifar10-c:{tmp_path / 'nolabels'}:fog:1", "labels.npy"))
    bad = tmp_path / "badshape"
    fabricate_cifar10c(bad)
    np.save(bad / "fog.npy", np.zeros((20, 31, 32, 3), np.uint8))
    cases.append((f"cifar10-c:{bad}:fog:1", "expected uint8"))
    bad2 = tmp_path / "badlabels"
    fabricate_cifar10c(bad2)
    np.save(bad2 / "labels.npy", np.zeros(7, np.uint8))
    cases.append((f"cifar10-c:{bad2}:fog:1", "labels"))
    bad3 = tmp_path / "notfive"
    fabricate_cifar10c(bad3)
    np.save(bad3 / "gaussian_noise.npy", np.zeros((19, 32, 32, 3), np.uint8))
    cases.append((f"cifar10-c:{bad3}:fog:1", "5 x N"))
    for spec, msg in cases:
        with pytest.raises(BnadaptError, match=msg) as e:
            load_dataset(spec)
        assert "\n" not in str(e.value), spec


def test_imagenet_c_reader(tmp_path):
    from PIL import Image

    root = tmp_path / "inc"
    rng = np.random.default_rng(0)
    pix = {}
    for s in range(1, 6):
        for cls in ("n01", "n02"):
            d = root / "gaussian_noise" / str(s) / cls
            d.mkdir(parents=True)
            for k in range(2):
                arr = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"img{k}.png")
                pix[(s, cls, k)] = arr
    ds = load_dataset(f"imagenet-c:{root}:gaussian_noise:4")
    assert len(ds) == 4 and ds.image_shape == (3, 8, 8) and ds.class_names == ["n01", "n02"]
    x, y = ds.get([2])
    assert y.item() == 1 and torch.allclose(x[0], torch.from_numpy(pix[(4, "n02", 0)].transpose(2, 0, 1) / 255).float())
    import shutil

    shutil.rmtree(root / "gaussian_noise" / "5")
    from bnadapt.data.corrupted import CorruptedSet

    with pytest.raises(BnadaptError, match="severity folder 5"):
        CorruptedSet(root, "imagenet-c")
    with pytest.raises(BnadaptError, match="no corruption folders"):
        CorruptedSet(tmp_path, "imagenet-c")


def test_table3_heading_counts_the_corruptions_it_averages():
    from bnadapt.corruptions.metrics import aggregate, summarize
    from bnadapt.corruptions.names import COMMON
    from bnadapt.corruptions.tables import table3

    def result(names):
        m = aggregate([summarize(0.9, {c: [0.5] * 5 for c in names}, None)])
        return {"inputs": {"params": {"reference": None, "severity_params_label": "imagenet", "batch_size": 8,
                                      "rho": 1.0, "runs": 1}, "data": {"n": 10}},
                "results": {"rows": [{"model": "m", "metrics": {"standard": m, "adapted": None}}]}}

    assert "mean over the 15 ImageNet-C corruptions x" in table3(result(COMMON))[0]
    head = table3(result(COMMON[:4]))[0]
    assert "mean over the 4 of the 15 ImageNet-C corruptions evaluated x" in head and "over the 15 ImageNet" not in head
