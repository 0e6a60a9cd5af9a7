"""Stream scenarios over corrupted sets: a position's image is the corrupted set's
version of the same source image; scenarios are reproducible and have the structure they claim; a
set whose images cannot be matched to the clean data is refused (library and ``bnadapt stream``)."""

import json

import numpy as np
import pytest
import torch

from bnadapt.corruptions.generate import generate
from bnadapt.data import TensorImageDataset, select
from bnadapt.errors import BnadaptError
from bnadapt.results import read_result
from bnadapt.stream import SCENARIOS, corrupted_source, make_stream, run_lengths, stream_batches
from bnadapt.stream.evaluate import online_slices

from tests.conftest import make_tiny_files
from tests.conftest import bad_cli as bad, run_cli as run

CPU = torch.device("cpu")
NOISES = ["gaussian_noise", "shot_noise", "impulse_noise"]
KW = {"iid": dict(corruptions="shot_noise", severity=4), "class-sorted": dict(corruptions="impulse_noise"),
      "gradual": dict(corruptions="gaussian_noise", severity_start=1, severity=5),
      "mixed": dict(corruptions=NOISES, severities=(0, 2, 5)),
      "shift": dict(corruptions="gaussian_noise,impulse_noise", severity_start=1, severity=5, change_at=0.3)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A tiny cache made by ``bnadapt corruptions generate``'s library function (torch engine, CIFAR
    table) from 45 of the 60 images of a tiny npz set, so set position k is NOT dataset image k."""
    tmp = tmp_path_factory.mktemp("streamc")
    tmp, data, ck = make_tiny_files(tmp, 60)
    sel = select(data, images=45)
    assert not np.array_equal(sel.indices, np.arange(45))
    generate(sel, tmp / "c", corruptions=NOISES, params="cifar", engine="torch", device="cpu", quiet=True)
    return tmp, data, ck, tmp / "c", sel


@pytest.fixture(scope="module")
def source(cache):
    return corrupted_source(cache[3])


def images(source, stream, batch_size):
    return torch.cat([x for *_, x, _ in stream_batches(source.dataset, stream, online_slices(len(stream), batch_size),
                                                       device=CPU)])


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_reproducible_and_run_dependent(source, scenario):
    sel = source.selection()
    a, b = (make_stream(sel, scenario=scenario, corrupted=source, seed=3, run=1, **KW[scenario]) for _ in range(2))
    for k in ("indices", "sigma", "corruption", "severity"):
        assert np.array_equal(getattr(a, k), getattr(b, k))
    assert a.describe() == b.describe() and a.corruptions == b.corruptions
    assert torch.equal(images(source, a, 7), images(source, b, 7))
    c = make_stream(sel, scenario=scenario, corrupted=source, seed=3, run=2, **KW[scenario])
    assert not np.array_equal(a.indices, c.indices)
    assert np.array_equal(np.sort(a.indices), sel.indices)  # each image of the set once
    assert a.params["sigma"] == 0.0 and not np.any(a.sigma)  # no added noise unless asked


def test_position_shows_the_set_image_of_the_same_source_image(cache, source):
    """Every position: exactly the set's image of that source image at its (corruption, severity), the
    clean image at severity 0; the same at batch 1 and 16; and the nearest clean image is its own."""
    _, _, _, folder, gen_sel = cache
    cset = source.cset
    assert np.array_equal(source.indices, gen_sel.indices)  # rebuilt from the manifest's source selection
    s = make_stream(source.selection(), scenario="mixed", corrupted=source, corruptions=NOISES,
                    severities=(0, 1, 2, 3, 4, 5), length=200)
    x1, x16 = images(source, s, 1), images(source, s, 16)
    assert torch.equal(x1, x16)
    clean_all = source.dataset.get(s.indices)[0]
    assert 0 < np.sum(s.severity == 0) < len(s)
    for t in range(len(s)):
        k = int(np.flatnonzero(gen_sel.indices == s.indices[t])[0])  # the set position, found independently
        if s.severity[t] == 0:
            assert s.corruption[t] == -1 and torch.equal(x1[t], clean_all[t])
        else:
            want = cset.dataset(s.corruptions[s.corruption[t]], int(s.severity[t])).get([k])[0][0]
            assert torch.equal(x1[t], want)
    # the corrupted image is a noisy copy of ITS clean image: nearest among all clean images of the data
    low = np.flatnonzero((s.severity >= 1) & (s.severity <= 2) & (s.corruption == 0))
    every = source.dataset.get(np.arange(len(source.dataset)))[0].flatten(1)
    d = torch.cdist(x1[low].flatten(1), every)
    assert np.array_equal(d.argmin(1).numpy(), s.indices[low])
    # labels are the clean data's (equal to the set's)
    y = torch.cat([y for *_, y in stream_batches(source.dataset, s, online_slices(len(s), 5), device=CPU)])
    assert np.array_equal(y.numpy(), s.labels)


def test_scenario_structure(source):
    sel = source.selection()
    L = 3000  # a long stream (images repeat) for the statistics
    g = make_stream(sel, scenario="gradual", corrupted=source, corruptions="gaussian_noise", severity_start=1,
                    severity=5, length=L)
    assert np.all(np.diff(g.severity) >= 0) and g.severity[0] == 1 and g.severity[-1] == 5
    assert np.array_equal(np.bincount(g.severity)[1:], [L // 5] * 5)  # equal plateaus
    assert set(g.corruption) == {0}
    g0 = make_stream(sel, scenario="gradual", corrupted=source, corruptions="gaussian_noise", severity=5, length=L)
    assert g0.severity[0] == 0 and g0.corruption[0] == -1 and np.all(np.diff(g0.severity) >= 0)
    down = make_stream(sel, scenario="gradual", corrupted=source, corruptions="gaussian_noise", severity_start=5,
                       severity=2, length=L)
    assert np.all(np.diff(down.severity) <= 0) and down.severity[-1] == 2
    m = make_stream(sel, scenario="mixed", corrupted=source, corruptions=NOISES, severities=(2, 4), length=L)
    dom = m.domains()
    counts = np.unique(dom, return_counts=True)[1]
    assert len(counts) == 6
    chi2 = np.sum((counts - L / 6) ** 2 / (L / 6))
    assert chi2 < 20.5  # uniform over the 6 domains (chi-square, 5 dof, p = 0.001)
    assert abs(np.mean(dom[1:] == dom[:-1]) - 1 / 6) < 0.04  # interleaved, not in blocks
    assert m.describe()["domain_changes"] > 0.7 * L
    sh = make_stream(sel, scenario="shift", corrupted=source, corruptions="gaussian_noise,impulse_noise", severity=4,
                     change_at=0.25, length=L)
    change = np.flatnonzero(np.diff(sh.domains()))
    assert list(change) == [L // 4 - 1]
    assert sh.corruptions[sh.corruption[0]] == "gaussian_noise" and sh.corruptions[sh.corruption[-1]] == "impulse_noise"
    assert set(sh.severity) == {4}  # between two corruptions the severity defaults to --severity
    sh1 = make_stream(sel, scenario="shift", corrupted=source, corruptions="shot_noise", length=L)
    assert sh1.severity[0] == 0 and sh1.severity[-1] == 3 and len(np.flatnonzero(np.diff(sh1.severity))) == 1
    it = make_stream(sel, scenario="iid", corrupted=source, corruptions="shot_noise", severity=4, length=L)
    assert set(it.severity) == {4} and abs(np.mean(it.labels[1:] == it.labels[:-1]) - 1 / 3) < 0.05
    cs = make_stream(sel, scenario="class-sorted", corrupted=source, corruptions="impulse_noise", concentration=0.01)
    assert run_lengths(cs.labels).mean() > 4 * run_lengths(it.labels[:len(cs)]).mean()  # still label-sorted
    assert set(cs.severity) == {3} and cs.describe()["domains"] == 1
    # the noise stream of the same selection has the same order: corruption domains change only the images
    assert np.array_equal(make_stream(sel, scenario="iid", seed=5).indices,
                          make_stream(sel, scenario="iid", seed=5, corrupted=source, corruptions="shot_noise").indices)


def test_added_noise_on_top_of_the_corruption(source):
    sel = source.selection()
    s0 = make_stream(sel, scenario="iid", corrupted=source, corruptions="shot_noise", length=64)
    s1 = make_stream(sel, scenario="iid", corrupted=source, corruptions="shot_noise", sigma=0.1, length=64)
    x0, x1 = images(source, s0, 8), images(source, s1, 8)
    assert not torch.equal(x0, x1) and (x1 - x0).std().item() == pytest.approx(0.1, rel=0.2)


def _released(tmp, x, y):
    """A set in the released CIFAR-10-C layout (no manifest): corrupted = 255 - clean at every severity."""
    folder = tmp / "released"
    folder.mkdir(exist_ok=True)
    inv = (255 - x)[:, :, :, 0]
    np.save(folder / "contrast.npy", np.concatenate([inv] * 5))
    np.save(folder / "labels.npy", np.tile(y, 5))
    return folder


def test_a_released_set_is_matched_image_k_to_image_k(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(30, 8, 8, 1), dtype=np.uint8)
    y = np.arange(30) % 3
    folder = _released(tmp_path, x, y)
    ds = TensorImageDataset(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y), name="toy")
    src = corrupted_source(folder, ds)
    assert src.params == "cifar" and "assumed" in src.params_how and np.array_equal(src.indices, np.arange(30))
    assert "declared" in corrupted_source(folder, ds, params="imagenet").params_how
    s = make_stream(src.selection(images=12), scenario="iid", corrupted=src, corruptions="contrast", severity=2)
    x1 = images(src, s, 1)
    inverted = torch.from_numpy(255 - x[s.indices]).permute(0, 3, 1, 2).float() / 255.0
    assert torch.equal(x1, inverted)  # image k of the set is clean image k (inverted here)
    with pytest.raises(BnadaptError, match="manifest"):
        corrupted_source(folder)  # a released set: the clean data must be given
    other = TensorImageDataset(torch.from_numpy(x[:20]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y[:20]))
    with pytest.raises(BnadaptError, match="20 images"):
        corrupted_source(folder, other)
    shuffled = TensorImageDataset(ds.images, torch.from_numpy((y + 1) % 3))
    with pytest.raises(BnadaptError, match="labels"):
        corrupted_source(folder, shuffled)


def test_bad_input_is_one_line(cache, source):
    tmp, data, _, folder, _ = cache
    sel = source.selection()

    def err(match, f, *a, **k):
        with pytest.raises(BnadaptError, match=match) as e:
            f(*a, **k)
        assert "\n" not in str(e.value)

    ms = lambda **k: make_stream(sel, corrupted=source, **k)  # noqa: E731
    err("has no fog", ms, scenario="iid", corruptions="fog")  # a corruption not in the set
    err("takes one corruption", ms, scenario="iid", corruptions="gaussian_noise,shot_noise")
    err("takes one or two", ms, scenario="shift", corruptions=NOISES)
    err("unknown corruption", ms, scenario="iid", corruptions="rain")
    err("severity must be >= 1", ms, scenario="iid", corruptions="shot_noise", severity=0)
    err("severity must be <= 5", ms, scenario="iid", corruptions="shot_noise", severity=6)
    err("severity_start", ms, scenario="iid", corruptions="shot_noise", severity_start=1)
    err("severities", ms, scenario="gradual", corruptions="shot_noise", severities=(1, 2))
    err("severities must be <= 5", ms, scenario="mixed", corruptions="shot_noise", severities=(1, 7))
    err("duplicates", ms, scenario="mixed", corruptions="shot_noise,noise")
    err("empty", ms, scenario="iid", corruptions="")
    # data the set was not made from
    rng = np.random.default_rng(7)
    np.savez(tmp / "other.npz", x=rng.integers(0, 256, size=(60, 12, 12, 1), dtype=np.uint8),
             y=rng.integers(0, 3, size=60))
    err("is not the data", corrupted_source, folder, str(tmp / "other.npz"))
    err("parameter table", corrupted_source, folder, params="imagenet")  # the manifest says cifar
    err("not in the corrupted set", make_stream, select(data), corrupted=source, corruptions="shot_noise")
    alien = select(str(tmp / "other.npz"))
    err("is not the data", make_stream, alien, corrupted=source, corruptions="shot_noise")
    s = make_stream(sel, corrupted=source, corruptions="shot_noise")
    err("is not the data", lambda: list(stream_batches(alien.dataset, s, online_slices(len(s), 4), device=CPU)))
    err("not found", corrupted_source, tmp / "nope")
    err("one corruption and severity", corrupted_source, f"cifar10-c:{folder}:shot_noise:3")


def test_stream_command_on_a_corrupted_set(cache, capsys):
    tmp, data, ck, folder, _ = cache
    out = tmp / "s.json"
    argv = ["stream", "--model", ck, "--corrupted", str(folder), "--scenario", "gradual", "--corruptions",
            "gaussian_noise", "--severity-start", "1", "--severity", "5", "--images", "30", "--batch-sizes", "1,4",
            "--runs", "2", "--window", "16", "--quiet", "--device", "cpu", "--threads", "1"]
    code, stdout, err = run(capsys, *argv, "--out", str(out))
    assert code == 0, err
    assert "CIFAR-10-C severity parameters" in stdout and "corruptions=gaussian_noise" in stdout
    res = read_result(out, "stream")
    p, d = res["inputs"]["params"], res["inputs"]["data"]
    assert p["stream"]["scenario"] == "gradual" and p["stream"]["severity_start"] == 1 and p["stream"]["severity"] == 5
    assert p["stream"]["corruptions"] == ["gaussian_noise"] and p["stream"]["length"] == 30
    assert p["severity_params"] == "cifar" and "CIFAR-10-C" in p["severity_params_label"]
    assert d["corrupted"]["set"]["dir"] == str(folder) and d["corrupted"]["severity_params_from"] == "the manifest"
    assert d["corrupted"]["set"]["checksums"]["gaussian_noise"] and d["n"] == 30
    assert res["results"]["severity_curve"][0] < res["results"]["severity_curve"][-1]
    assert all(s["severity_min"] == 1 and s["severity_max"] == 5 for s in res["results"]["streams"])
    code, _, _ = run(capsys, *argv, "--out", str(tmp / "again.json"))
    assert read_result(tmp / "again.json")["results"]["rows"] == res["results"]["rows"]  # reproducible
    # the image set of the stream: 30 of the set's 45 images, chosen over the set's labels
    assert json.loads(out.read_text())["inputs"]["data"]["corrupted"]["clean"]["n"] == 45


def test_stream_command_bad_input(cache, capsys):
    tmp, data, ck, folder, _ = cache
    base = ["stream", "--model", ck, "--quiet", "--device", "cpu", "--batch-sizes", "4", "--runs", "1"]
    c = [*base, "--corrupted", str(folder)]
    assert "--corrupted" in bad(capsys, tmp, *base, "--data", data, "--corruptions", "shot_noise")
    assert "--corrupted" in bad(capsys, tmp, *base, "--data", data, "--severity", "2")
    assert "--corruptions" in bad(capsys, tmp, *c)
    assert "has no fog" in bad(capsys, tmp, *c, "--corruptions", "fog")
    assert "--corruptions" in bad(capsys, tmp, *c, "--corruptions", "shot_noise,gaussian_noise")
    assert "--severity" in bad(capsys, tmp, *c, "--corruptions", "shot_noise", "--severity", "6")
    assert "--severity-start" in bad(capsys, tmp, *c, "--corruptions", "shot_noise", "--severity-start", "2")
    mixed = [*c, "--scenario", "mixed", "--corruptions", "noise"]
    assert "--severities" in bad(capsys, tmp, *mixed, "--severities", "1,x")
    assert "--sigmas" in bad(capsys, tmp, *mixed, "--sigmas", "0,0.5")
    assert "--params" in bad(capsys, tmp, *c, "--corruptions", "shot_noise", "--params", "imagenet")
    assert "--split" in bad(capsys, tmp, *c, "--corruptions", "shot_noise", "--split", "train")
    rng = np.random.default_rng(8)
    np.savez(tmp / "other2.npz", x=rng.integers(0, 256, size=(60, 12, 12, 1), dtype=np.uint8),
             y=rng.integers(0, 3, size=60))
    assert "is not the data" in bad(capsys, tmp, *c, "--corruptions", "shot_noise", "--data", str(tmp / "other2.npz"))
    assert "not found" in bad(capsys, tmp, *base, "--corrupted", str(tmp / "missing"), "--corruptions", "shot_noise")
    assert "--images" in bad(capsys, tmp, *c, "--corruptions", "shot_noise", "--images", "0")
