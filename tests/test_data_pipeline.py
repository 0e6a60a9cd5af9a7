"""The data pipeline: decoding workers and decoded caches never change a number; caches are written once,
atomically, and refused when they do not match; memory stays a few batches whatever the set size."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from bnadapt.data import load_image_folder
from bnadapt.data.pipeline import batches, set_loading, to_float, using
from bnadapt.errors import BnadaptError
from tests.conftest import run_cli


def make_jpeg_folder(root, n_per_class=8, classes=3, size=(60, 45), seed=0):
    """``root/<class>/<i>.jpg``: smooth random JPEGs (landscape, so resize and crop both act)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize(size, Image.Resampling.BILINEAR).save(root / f"c{c}" / f"{i:03d}.jpg",
                                                                                quality=90)
    return root


@pytest.fixture
def folder(tmp_path):
    return make_jpeg_folder(tmp_path / "imgs")


def _all(ds, chunk=5, **kw):
    idx = np.random.default_rng(1).permutation(len(ds))
    chunks = [idx[a:a + chunk] for a in range(0, len(idx), chunk)]
    got = list(batches(ds, chunks, **kw))
    return torch.cat([x for x, _ in got]), torch.cat([y for _, y in got]), idx


def test_workers_give_the_same_batches_in_the_same_order(folder):
    ds = load_image_folder(folder, resize=40, crop=32)
    x0, y0, idx = _all(ds, workers=0)
    assert x0.dtype == torch.uint8 and x0.shape == (24, 3, 32, 32)
    for w in (1, 2):
        xw, yw, _ = _all(ds, workers=w)
        assert torch.equal(xw, x0) and torch.equal(yw, y0)
    x, y = ds.get(idx)
    assert torch.equal(to_float(x0), x) and torch.equal(y0, y)  # get_raw / 255 is exactly get


def test_cache_is_bit_equal_written_once_and_reused(folder, tmp_path, monkeypatch):
    ds = load_image_folder(folder, resize=40, crop=32)
    ref = ds.decode(np.arange(len(ds)))
    cache = tmp_path / "cache"
    with using(workers=2, cache=cache):
        x, _, idx = _all(ds)
        assert torch.equal(x, ref[torch.from_numpy(idx)])
        files = sorted(p.name for p in cache.iterdir())
        assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npy")
        assert not ds.decodes()
        stored = np.load(cache / files[1], mmap_mode="r")
        assert stored.shape == (24, 3, 32, 32) and np.array_equal(stored, ref.numpy())
        # a new dataset object (another run, model or stage) reads the cache: no decoding at all
        again = load_image_folder(folder, resize=40, crop=32)
        monkeypatch.setattr(type(again), "load_image", lambda *a: pytest.fail("decoded despite the cache"))
        x2, _, _ = _all(again)
        assert torch.equal(x2, x)
        monkeypatch.undo()
        # another preprocessing gets its own cache
        other = load_image_folder(folder, resize=36, crop=36)
        _all(other)
        assert len(list(cache.glob("*.npy"))) == 2


def test_damaged_or_foreign_cache_is_refused_in_one_line(folder, tmp_path):
    ds = load_image_folder(folder, resize=40, crop=32)
    cache = tmp_path / "cache"
    with using(workers=0, cache=cache):
        _all(ds)
    npy, meta = next(cache.glob("*.npy")), next(cache.glob("*.json"))
    desc = json.loads(meta.read_text())
    desc["preprocessing"]["center_crop"] = 30
    meta.write_text(json.dumps(desc))
    with using(workers=0, cache=cache), pytest.raises(BnadaptError, match="does not match") as e:
        load_image_folder(folder, resize=40, crop=32).get([0])
    assert "\n" not in str(e.value) and "delete" in str(e.value)
    desc["preprocessing"]["center_crop"] = 32
    meta.write_text(json.dumps(desc))
    with open(npy, "r+b") as f:
        f.truncate(os.path.getsize(npy) - 100)
    with using(workers=0, cache=cache), pytest.raises(BnadaptError, match="does not match"):
        load_image_folder(folder, resize=40, crop=32).get([0])


def test_an_interrupted_build_leaves_no_cache(folder, tmp_path, monkeypatch):
    ds = load_image_folder(folder, resize=40, crop=32)
    (folder / "c1" / "003.jpg").write_bytes(b"not a jpeg")
    cache = tmp_path / "cache"
    with using(workers=0, cache=cache), pytest.raises(BnadaptError, match="003.jpg"):
        ds.get([0])
    assert list(cache.iterdir()) == []


def test_a_changed_image_gets_a_new_cache(folder, tmp_path):
    cache = tmp_path / "cache"
    with using(workers=0, cache=cache):
        _all(load_image_folder(folder, resize=40, crop=32))
        p = folder / "c0" / "000.jpg"
        Image.new("RGB", (60, 45), (255, 0, 0)).save(p)
        x = load_image_folder(folder, resize=40, crop=32).get([0])[0]
        assert len(list(cache.glob("*.npy"))) == 2 and float(x[0, 0].mean()) > 0.9


def test_accuracy_is_the_same_whatever_the_loading(folder, tmp_path, one_thread):
    from bnadapt.noise import accuracy
    from tests.conftest import make_trained_bn_model

    ds = load_image_folder(folder, resize=40, crop=32)
    m = make_trained_bn_model(in_ch=3)
    ref = [accuracy(m, ds, sigma=0.25, rho=rho, batch_size=8, seed=3) for rho in (None, 0.5)]
    for kw in ({"workers": 2}, {"workers": 1, "cache": tmp_path / "c"}, {"workers": 0, "cache": tmp_path / "c"}):
        with using(**kw):
            assert [accuracy(m, ds, sigma=0.25, rho=rho, batch_size=8, seed=3) for rho in (None, 0.5)] == ref


def test_stream_is_the_same_whatever_the_loading(folder, tmp_path, one_thread):
    from bnadapt.data import select
    from bnadapt.stream.scenarios import make_stream, stream_batches

    ds = load_image_folder(folder, resize=40, crop=32)
    st = make_stream(select(f"folder:{folder}", dataset=ds), scenario="class-sorted", sigma=0.25, seed=0)
    slices = [slice(a, min(a + 7, len(st))) for a in range(0, len(st), 7)]

    def read():
        return [x for _, _, x, _ in stream_batches(ds, st, slices, device=torch.device("cpu"))]

    ref = read()
    for kw in ({"workers": 2}, {"workers": 0, "cache": tmp_path / "c"}):
        with using(**kw):
            assert all(torch.equal(a, b) for a, b in zip(read(), ref))


def test_cli_loading_options(folder, tmp_path, capsys, one_thread):
    from tests.conftest import bad_cli, make_trained_bn_model

    from bnadapt.models import save_checkpoint

    args = {"in_channels": 3, "num_classes": 3, "widths": [4, 8], "depth": 1}
    ck = save_checkpoint(tmp_path / "m.safetensors", make_trained_bn_model(in_ch=3),
                         {"arch": "preact_resnet", "arch_args": args, "input_shape": [3, 32, 32], "name": "t"})
    base = ["noise", "--model", str(ck), "--data", f"folder:{folder}", "--resize", "40", "--crop", "32",
            "--sigmas", "0,0.25", "--runs", "2", "--batch-size", "8", "--threads", "1", "--quiet"]
    try:
        outs = []
        for i, extra in enumerate((["--workers", "0"], ["--workers", "2", "--cache", str(tmp_path / "c")],
                                   ["--cache", str(tmp_path / "c")])):
            out = tmp_path / f"r{i}.json"
            code, _, err = run_cli(capsys, *base, *extra, "--out", str(out))
            assert code == 0, err
            outs.append(json.loads(out.read_text()))
        assert outs[0]["results"] == outs[1]["results"] == outs[2]["results"]
        assert outs[0]["inputs_sha256"] == outs[1]["inputs_sha256"] == outs[2]["inputs_sha256"]
        (tmp_path / "afile").write_text("x")
        assert "is a file" in bad_cli(capsys, tmp_path, *base, "--cache", str(tmp_path / "afile"))
        assert "--workers" in bad_cli(capsys, tmp_path, *base, "--workers", "-1")
        if os.geteuid() != 0:  # root writes anywhere
            ro = tmp_path / "ro"
            ro.mkdir()
            ro.chmod(0o500)
            assert "--cache" in bad_cli(capsys, tmp_path, *base, "--cache", str(ro / "c"))
    finally:
        set_loading()


def _peak_rss_mb(folder, workers, cache="-"):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_data.py"
    spec = importlib.util.spec_from_file_location("bench_data", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.peak_rss_mb(folder, workers, cache)


def test_memory_stays_a_few_batches_whatever_the_set_size(tmp_path):
    """A pass over 32 and over 288 full-size (500x375) JPEGs at 224 px: the larger set is 173 MB as float32
    (uint8: 43 MB), yet the peak memory of the pass (this process or any worker) grows by far less."""
    small = make_jpeg_folder(tmp_path / "small", n_per_class=16, classes=2, size=(500, 375))
    large = make_jpeg_folder(tmp_path / "large", n_per_class=144, classes=2, size=(500, 375))
    float32_mb = 288 * 3 * 224 * 224 * 4 / 2**20
    for workers, cache in ((2, "-"), (0, tmp_path / "cache")):
        base = _peak_rss_mb(small, workers, cache)
        peak = _peak_rss_mb(large, workers, cache)
        assert peak - base < 0.15 * float32_mb, (workers, cache, base, peak, float32_mb)
