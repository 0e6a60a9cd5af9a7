"""Data loaders: tiny files of every format built in tmp_path, plus the real Fashion-MNIST test split."""

from __future__ import annotations

import gzip
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bnadapt.data import (ImageDataset, TensorImageDataset, load_arrays, load_cifar10, load_dataset,
                          load_fashion_mnist, load_image_folder, subset_indices)
from bnadapt.data import fashion_mnist as fm
from bnadapt.errors import BnadaptError

FM_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
REAL_FM = Path("/usr/share/datasets/fashion-mnist")


def assert_one_line(err: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg and msg
    for n in needles:
        assert n in msg, (n, msg)


# ---------------------------------------------------------------- Fashion-MNIST (idx files)

def idx_bytes(magic: int, arr: np.ndarray) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def write_idx(path: Path, data: bytes, gz: bool) -> Path:
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_fmnist(root: Path, n: int = 5, gz: bool = True, split: str = "t10k", labels=None, images=None):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    if images is None:
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[0, 0, 0], images[0, 0, 1] = 255, 0
    labels = np.arange(n, dtype=np.uint8) % 10 if labels is None else np.asarray(labels, dtype=np.uint8)
    ip = write_idx(root / f"{split}-images-idx3-ubyte", idx_bytes(0x803, images), gz)
    lp = write_idx(root / f"{split}-labels-idx1-ubyte", idx_bytes(0x801, labels), gz)
    return images, labels, ip, lp


@pytest.mark.parametrize("gz", [True, False])
def test_fmnist_roundtrip(tmp_path, gz):
    images, labels, _, _ = make_fmnist(tmp_path, gz=gz)
    ds = load_fashion_mnist("test", root=tmp_path)
    assert isinstance(ds, TensorImageDataset) and ds.name == "fashion-mnist/test"
    assert len(ds) == 5 and ds.image_shape == (1, 28, 28) and ds.class_names == FM_NAMES
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (5, 1, 28, 28)
    x, y = ds.get([0, 3])
    assert x.dtype == torch.float32 and x.shape == (2, 1, 28, 28)
    assert x[0, 0, 0, 0] == 1.0 and x[0, 0, 0, 1] == 0.0 and 0.0 <= x.min() and x.max() <= 1.0
    assert torch.equal(x[:, 0], torch.from_numpy(images[[0, 3]]).float() / 255)
    assert y.dtype == torch.int64 and y.tolist() == [0, 3]


def test_fmnist_train_split_and_env_root(tmp_path, monkeypatch):
    make_fmnist(tmp_path, n=7, split="train", gz=False)
    monkeypatch.setenv("BNADAPT_FASHION_MNIST", str(tmp_path))
    ds = load_fashion_mnist("train")
    assert len(ds) == 7 and ds.name == "fashion-mnist/train"
    with pytest.raises(BnadaptError) as e:
        load_fashion_mnist("val", root=tmp_path)
    assert_one_line(e, "'train' or 'test'")


def test_fmnist_cache_is_private_and_sees_rewrites(tmp_path):
    make_fmnist(tmp_path, n=4)
    a = load_fashion_mnist(root=tmp_path)
    a.images.zero_()
    b = load_fashion_mnist(root=tmp_path)
    assert b.images.max() > 0
    make_fmnist(tmp_path, n=6)  # different size: the cache key changes
    assert len(load_fashion_mnist(root=tmp_path)) == 6


def test_fmnist_missing_files(tmp_path):
    with pytest.raises(BnadaptError) as e:
        load_fashion_mnist(root=tmp_path / "nowhere")
    assert_one_line(e, "apt-get install -y dataset-fashion-mnist", str(tmp_path / "nowhere"))


@pytest.mark.parametrize("gz", [True, False])
def test_fmnist_bad_magic(tmp_path, gz):
    _, _, ip, _ = make_fmnist(tmp_path, gz=gz)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", idx_bytes(0x801, np.zeros((5, 28, 28))), gz)
    with pytest.raises(BnadaptError) as e:
        load_fashion_mnist(root=tmp_path)
    assert_one_line(e, ip.name, "magic")


@pytest.mark.parametrize("gz", [True, False])
def test_fmnist_truncated(tmp_path, gz):
    _, _, ip, _ = make_fmnist(tmp_path, gz=gz)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", idx_bytes(0x803, np.zeros((5, 28, 28)))[:-10], gz)
    with pytest.raises(BnadaptError) as e:
        load_fashion_mnist(root=tmp_path)
    assert_one_line(e, ip.name, "truncated")
    write_idx(tmp_path / "t10k-images-idx3-ubyte", b"\x00\x00\x08", gz)  # not even a header
    with pytest.raises(BnadaptError) as e:
        load_fashion_mnist(root=tmp_path)
    assert_one_line(e, ip.name)


def test_fmnist_corrupt_gzip(tmp_path):
    _, _, ip, _ = make_fmnist(tmp_path, gz=True)
    ip.write_bytes(b"this is not gzip data at all")
    with pytest.raises(BnadaptError) as e:
        load_fashion_mnist(root=tmp_path)
    assert_one_line(e, ip.name)
    ip.write_bytes(gzip.compress(b"x" * 5000)[:50])  # truncated gzip stream
    with pytest.raises(BnadaptError) as e:
        load_fashion_mnist(root=tmp_path)
    assert_one_line(e, ip.name)


def test_fmnist_label_out_of_range(tmp_path):
    _, _, _, lp = make_fmnist(tmp_path, labels=[0, 1, 2, 10, 3])
    with pytest.raises(BnadaptError) as e:
        load_fashion_mnist(root=tmp_path)
    assert_one_line(e, lp.name, "0..9")


def test_fmnist_count_mismatch_and_wrong_dims(tmp_path):
    make_fmnist(tmp_path, n=5, labels=[0, 1, 2, 3])
    with pytest.raises(BnadaptError) as e:
        load_fashion_mnist(root=tmp_path)
    assert_one_line(e, "5 images", "4 labels")
    make_fmnist(tmp_path, n=2, images=np.zeros((2, 14, 14), np.uint8))
    with pytest.raises(BnadaptError) as e:
        load_fashion_mnist(root=tmp_path)
    assert_one_line(e, "28x28")


@pytest.mark.skipif(not (REAL_FM / "t10k-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed")
def test_fmnist_real_test_split():
    fm.clear_cache()
    t = time.perf_counter()
    ds = load_fashion_mnist("test")
    elapsed = time.perf_counter() - t
    assert elapsed < 1.0, elapsed
    assert len(ds) == 10_000 and ds.image_shape == (1, 28, 28) and ds.images.dtype == torch.uint8
    assert torch.bincount(ds.labels, minlength=10).tolist() == [1000] * 10
    x, _ = ds.get([0])
    assert x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0


# ---------------------------------------------------------------- CIFAR-10 (binary version)

def make_cifar(parent: Path, n: int = 2, meta: bool = True) -> Path:
    folder = parent / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    for b, name in enumerate([f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]):
        recs = np.zeros((n, 3073), np.uint8)
        for r in range(n):
            recs[r, 0] = (b + r) % 10
            recs[r, 1:1025], recs[r, 1025:2049], recs[r, 2049:] = 10 * b + r, 100 + r, 255  # R, G, B planes
        (folder / name).write_bytes(recs.tobytes())
    if meta:
        (folder / "batches.meta.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n\n")
    return folder


def test_cifar_roundtrip(tmp_path):
    folder = make_cifar(tmp_path)
    for root in (tmp_path, folder):  # the parent or the folder itself
        ds = load_cifar10(root, "test")
        assert len(ds) == 2 and ds.image_shape == (3, 32, 32) and ds.name == "cifar10/test"
        assert ds.class_names == [f"c{i}" for i in range(10)]
        x, y = ds.get([0, 1])
        assert x.dtype == torch.float32 and y.tolist() == [5, 6]
        assert torch.equal(x[1, 0], torch.full((32, 32), 51 / 255))
        assert torch.equal(x[1, 1], torch.full((32, 32), 101 / 255)) and bool((x[:, 2] == 1.0).all())
    train = load_cifar10(tmp_path, "train")
    assert len(train) == 10 and train.labels.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    assert train.images[8, 0, 0, 0] == 40  # batch 5, record 0: R = 10 * 4


def test_cifar_default_names_and_errors(tmp_path):
    folder = make_cifar(tmp_path, meta=False)
    assert load_cifar10(folder).class_names[0] == "airplane"
    (folder / "batches.meta.txt").write_text("a\nb\n")
    with pytest.raises(BnadaptError) as e:
        load_cifar10(folder)
    assert_one_line(e, "batches.meta.txt", "10 class names")
    (folder / "batches.meta.txt").unlink()
    (folder / "test_batch.bin").write_bytes(b"\x00" * 3000)
    with pytest.raises(BnadaptError) as e:
        load_cifar10(folder)
    assert_one_line(e, "test_batch.bin", "3073")
    (folder / "test_batch.bin").write_bytes(bytes([10]) + b"\x00" * 3072)
    with pytest.raises(BnadaptError) as e:
        load_cifar10(folder)
    assert_one_line(e, "test_batch.bin", "label 10")
    (folder / "data_batch_3.bin").unlink()
    with pytest.raises(BnadaptError) as e:
        load_cifar10(folder, "train")
    assert_one_line(e, "data_batch_3.bin", "cifar-10-binary")
    with pytest.raises(BnadaptError):
        load_cifar10(tmp_path / "missing")
    with pytest.raises(BnadaptError):
        load_cifar10(folder, "validation")


# ---------------------------------------------------------------- image folders

def png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_tree(root: Path) -> None:
    png(root / "b_cls" / "img2.png", np.full((30, 40, 3), (255, 0, 128), np.uint8))   # 40x30 RGB
    png(root / "b_cls" / "img1.PNG", np.full((50, 30), 77, np.uint8))                # 30x50 grayscale
    png(root / "a_cls" / "z.bmp", np.full((64, 64, 3), 10, np.uint8))
    (root / "a_cls" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()


def test_folder_resize_crop(tmp_path):
    make_tree(tmp_path)
    ds = load_image_folder(tmp_path, resize=32, crop=24)
    assert isinstance(ds, ImageDataset) and not hasattr(ds, "images")  # lazy: paths only
    assert ds.class_names == ["a_cls", "b_cls"] and ds.labels.tolist() == [0, 1, 1]
    assert [p.name for p in ds.paths] == ["z.bmp", "img1.PNG", "img2.png"]
    assert ds.image_shape == (3, 24, 24) and ds.name == f"folder/{tmp_path.name}"
    x, y = ds.get([0, 1, 2])
    assert x.dtype == torch.float32 and x.shape == (3, 3, 24, 24) and 0.0 <= x.min() and x.max() <= 1.0
    assert torch.allclose(x[0], torch.tensor(10 / 255)) and torch.allclose(x[1], torch.tensor(77 / 255))  # gray -> RGB
    assert torch.equal(x[2, 0], torch.ones(24, 24)) and torch.equal(x[2, 1], torch.zeros(24, 24))
    assert torch.allclose(x[2, 2], torch.tensor(128 / 255))


def test_folder_center_crop_and_resize_rule(tmp_path):
    arr = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)  # H=4, W=6
    png(tmp_path / "c" / "a.png", arr)
    x, _ = load_image_folder(tmp_path, resize=None, crop=2).get([0])
    assert torch.equal(x[0], torch.from_numpy(arr[1:3, 2:4].transpose(2, 0, 1).copy()).float() / 255)
    x, _ = load_image_folder(tmp_path, resize=None, crop=None).get([0])  # exact round trip
    assert torch.equal(x[0], torch.from_numpy(arr.transpose(2, 0, 1).copy()).float() / 255)
    png(tmp_path / "c" / "b.png", np.zeros((8, 12, 3), np.uint8))  # same aspect: 2x larger
    ds = load_image_folder(tmp_path, resize=3, crop=None)  # shorter side 3, longer int(3 * 6 / 4) = 4
    assert ds.image_shape == (3, 3, 4) and ds.get([0, 1])[0].shape == (2, 3, 3, 4)
    expected = np.asarray(Image.fromarray(arr).resize((4, 3), Image.Resampling.BILINEAR))
    assert torch.equal(ds.get([0])[0][0], torch.from_numpy(expected.transpose(2, 0, 1).copy()).float() / 255)


def test_folder_errors(tmp_path):
    make_tree(tmp_path)
    with pytest.raises(BnadaptError) as e:
        load_image_folder(tmp_path, resize=None, crop=None)  # sizes differ
    assert_one_line(e, "differ in size")
    ds = load_image_folder(tmp_path, resize=None, crop=48)
    with pytest.raises(BnadaptError) as e:
        ds.get([1])  # the 30x50 image is smaller than the crop
    assert_one_line(e, "img1.PNG", "smaller than crop")
    with pytest.raises(BnadaptError):
        load_image_folder(tmp_path, resize=16, crop=24)
    bad = tmp_path / "a_cls" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    ds = load_image_folder(tmp_path, resize=32, crop=24)
    with pytest.raises(BnadaptError) as e:
        ds.get([0])
    assert_one_line(e, "broken.jpg")
    with pytest.raises(BnadaptError) as e:
        load_image_folder(tmp_path, resize=32, crop=None)  # header check up front
    assert_one_line(e, "broken.jpg")
    with pytest.raises(BnadaptError):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(BnadaptError) as e:
        load_image_folder(tmp_path / "empty")
    assert_one_line(e, "no images")


# ---------------------------------------------------------------- .npz / .npy arrays

def test_npz_uint8_nhwc_and_gray(tmp_path):
    imgs = np.random.default_rng(1).integers(0, 256, size=(4, 5, 6, 3), dtype=np.uint8)
    imgs[0, 0, 0, 0] = 255
    np.savez(tmp_path / "a.npz", x=imgs, y=np.array([0, 2, 1, 2]), class_names=np.array(["u", "v", "w"]))
    ds = load_arrays(tmp_path / "a.npz")
    assert ds.images.dtype == torch.uint8 and ds.image_shape == (3, 5, 6) and ds.name == "arrays/a.npz"
    assert ds.class_names == ["u", "v", "w"] and ds.labels.tolist() == [0, 2, 1, 2]
    x, _ = ds.get([0, 1, 2, 3])
    assert x.dtype == torch.float32 and x[0, 0, 0, 0] == 1.0
    assert torch.equal(x, torch.from_numpy(imgs.transpose(0, 3, 1, 2).copy()).float() / 255)
    np.savez(tmp_path / "g.npz", images=imgs[..., 0], labels=np.array([[1], [0], [1], [0]], np.uint8))
    ds = load_arrays(tmp_path / "g.npz")
    assert ds.image_shape == (1, 5, 6) and ds.labels.tolist() == [1, 0, 1, 0] and ds.class_names == ["0", "1"]


def test_npz_float_nchw_keys_and_npy_pair(tmp_path):
    imgs = np.random.default_rng(2).random((3, 1, 4, 4))
    imgs[0, 0, 0, 0], imgs[0, 0, 0, 1] = 1.0, 0.0
    np.savez(tmp_path / "f.npz", data=imgs, targets=np.array([1, 0, 1], np.int32))
    ds = load_arrays(tmp_path / "f.npz")
    x, y = ds.get([0, 1, 2])
    assert x.dtype == torch.float32 and x[0, 0, 0, 0] == 1.0 and x[0, 0, 0, 1] == 0.0
    assert torch.equal(x, torch.from_numpy(imgs.astype(np.float32))) and y.tolist() == [1, 0, 1]
    np.savez(tmp_path / "k.npz", pix=imgs, cls=np.array([2, 2, 0]))
    assert load_arrays(tmp_path / "k.npz", images_key="pix", labels_key="cls").labels.tolist() == [2, 2, 0]
    np.save(tmp_path / "p.npy", imgs.astype(np.float32))
    np.save(tmp_path / "p_labels.npy", np.array([0, 1, 0]))
    ds = load_arrays(tmp_path / "p.npy")
    assert len(ds) == 3 and ds.name == "arrays/p.npy"


@pytest.mark.parametrize("arrays, needle", [
    (dict(x=np.full((2, 1, 3, 3), 1.5), y=np.array([0, 1])), "[0, 1]"),
    (dict(x=np.full((2, 1, 3, 3), np.nan), y=np.array([0, 1])), "NaN"),
    (dict(x=np.zeros((2, 3, 3, 5), np.uint8), y=np.array([0, 1])), "NHWC"),
    (dict(x=np.zeros((2, 3, 3, 3), np.int64), y=np.array([0, 1])), "dtype int64"),
    (dict(x=np.zeros((2, 3, 3, 3), np.uint8), y=np.array([0.0, 1.0])), "integer"),
    (dict(x=np.zeros((2, 3, 3, 3), np.uint8), y=np.array([0, 1, 1])), "3 labels"),
    (dict(x=np.zeros((2, 3, 3, 3), np.uint8), y=np.array([0, -1])), "negative"),
    (dict(x=np.zeros((2, 3, 3, 3), np.uint8), y=np.eye(2, dtype=np.int64)), "one-hot"),
    (dict(pixels=np.zeros((2, 3, 3, 3), np.uint8), y=np.array([0, 1])), "images key"),
    (dict(x=np.zeros((2, 3, 3, 3), np.uint8), y=np.array([0, 1]), classes=np.array(["a"])), "class names"),
])
def test_npz_bad_contents(tmp_path, arrays, needle):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(BnadaptError) as e:
        load_arrays(tmp_path / "bad.npz")
    assert_one_line(e, needle)


def test_arrays_bad_files(tmp_path):
    for junk in (b"PK\x03\x04 garbage garbage", b"plain text"):
        (tmp_path / "junk.npz").write_bytes(junk)
        with pytest.raises(BnadaptError) as e:
            load_arrays(tmp_path / "junk.npz")
        assert_one_line(e, "junk.npz")
    np.savez(tmp_path / "obj.npz", x=np.array([object()], dtype=object), y=np.array([0]))
    with pytest.raises(BnadaptError) as e:  # pickle stays disabled
        load_arrays(tmp_path / "obj.npz")
    assert_one_line(e, "obj.npz")
    np.save(tmp_path / "lonely.npy", np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(BnadaptError) as e:
        load_arrays(tmp_path / "lonely.npy")
    assert_one_line(e, "lonely_labels.npy")
    (tmp_path / "t.npy").write_bytes(b"\x93NUMPY garbage")
    np.save(tmp_path / "t_labels.npy", np.array([0]))
    with pytest.raises(BnadaptError):
        load_arrays(tmp_path / "t.npy")
    for p in (tmp_path / "nope.npz", tmp_path / "x.csv"):
        with pytest.raises(BnadaptError):
            load_arrays(p)


# ---------------------------------------------------------------- subset_indices

def test_subset_indices():
    labels = np.repeat(np.arange(10), [5, 5, 5, 5, 5, 5, 5, 5, 5, 1])
    idx = subset_indices(labels, 12, per_class=2, seed=3)
    assert len(idx) == 12 and len(set(idx.tolist())) == 12 and np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx], minlength=10).max() <= 2
    assert np.array_equal(idx, subset_indices(torch.from_numpy(labels), 12, per_class=2, seed=3))
    assert not all(np.array_equal(idx, subset_indices(labels, 12, per_class=2, seed=s)) for s in range(4, 8))
    one = subset_indices(labels, 10, per_class=1, seed=0)
    assert sorted(labels[one].tolist()) == list(range(10))
    assert len(subset_indices(labels, 46)) == 46
    for n, cap in ((20, 2), (47, None), (0, None)):
        with pytest.raises(BnadaptError):
            subset_indices(labels, n, per_class=cap)


# ---------------------------------------------------------------- load_dataset

def test_load_dataset_specs(tmp_path):
    make_fmnist(tmp_path / "fm")
    assert load_dataset(f"fashion-mnist:{tmp_path / 'fm'}").name == "fashion-mnist/test"
    assert load_dataset(str(tmp_path / "fm")).name == "fashion-mnist/test"
    make_cifar(tmp_path / "cf")
    assert load_dataset(f"cifar10:{tmp_path / 'cf'}", split="train").name == "cifar10/train"
    assert len(load_dataset(str(tmp_path / "cf"))) == 2
    make_tree(tmp_path / "imgs")
    assert load_dataset(f"folder:{tmp_path / 'imgs'}", resize=256, crop=224).name == "folder/imgs"
    assert load_dataset(str(tmp_path / "imgs"), resize=256, crop=224).image_shape == (3, 224, 224)
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 4, 4, 3), np.uint8), y=np.array([0, 1]))
    assert load_dataset(f"npz:{tmp_path / 'a.npz'}").name == "arrays/a.npz"
    assert len(load_dataset(str(tmp_path / "a.npz"))) == 2
    np.save(tmp_path / "b.npy", np.zeros((3, 4, 4), np.uint8))
    np.save(tmp_path / "b_labels.npy", np.array([0, 1, 2]))
    assert len(load_dataset(str(tmp_path / "b.npy"))) == 3


@pytest.mark.parametrize("spec", ["imagenet", "mnist:/x", "cifar10:", "", "/definitely/not/here"])
def test_load_dataset_unknown(spec):
    with pytest.raises(BnadaptError) as e:
        load_dataset(spec)
    assert_one_line(e)
    if spec in ("imagenet", "mnist:/x"):
        assert_one_line(e, "fashion-mnist", "cifar10:DIR", "folder:DIR", "npz:FILE.npz")


def test_load_dataset_unrecognised_dir(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(BnadaptError) as e:
        load_dataset(str(tmp_path))
    assert_one_line(e, "class subfolders")


def test_folder_auto_preprocessing(tmp_path):
    """Issue 8 #11: 32x32 folders keep their size by default; large images get the paper's 256/224."""
    for name, size in (("small", 32), ("large", 300)):
        for c in ("a", "b"):
            (tmp_path / name / c).mkdir(parents=True)
            Image.fromarray(np.full((size, size + 10, 3), 100, np.uint8)).save(tmp_path / name / c / "x.png")
    small = load_image_folder(tmp_path / "small")
    assert small.image_shape == (3, 32, 42) and small.preprocessing["center_crop"] is None
    large = load_image_folder(tmp_path / "large")
    assert large.image_shape == (3, 224, 224) and large.preprocessing["resize_shorter_side"] == 256
    assert load_image_folder(tmp_path / "small", resize=None, crop=16).image_shape == (3, 16, 16)
