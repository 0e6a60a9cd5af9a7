"""Stream scenarios: reproducible, and with the label / shift structure they claim (tested statistically)."""

import numpy as np
import pytest
import torch

from bnadapt.data import TensorImageDataset, select
from bnadapt.errors import BnadaptError
from bnadapt.stream import SCENARIOS, lengths_grid, make_stream, run_lengths, stream_batches, unit_noise
from bnadapt.stream.evaluate import online_slices


def selection(n=600, classes=10, labeled=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 1, 6, 6), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % classes
    ds = TensorImageDataset(x, y, name="toy")
    if not labeled:
        ds.has_labels = False
    return select("toy", None, dataset=ds)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_reproducible_and_run_dependent(scenario):
    sel = selection()
    a, b = make_stream(sel, scenario=scenario, seed=3, run=1), make_stream(sel, scenario=scenario, seed=3, run=1)
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.sigma, b.sigma)
    assert a.describe() == b.describe()
    c = make_stream(sel, scenario=scenario, seed=3, run=2)
    assert not np.array_equal(a.indices, c.indices)
    # every scenario plays each selected image once (length = selection size)
    assert np.array_equal(np.sort(a.indices), sel.indices)
    assert np.array_equal(a.labels, sel.dataset.labels.numpy()[a.indices])


def test_iid_has_no_label_structure_and_longer_streams_repeat():
    sel = selection()
    s = make_stream(sel, scenario="iid", seed=0)
    same = np.mean(s.labels[1:] == s.labels[:-1])
    assert abs(same - 0.1) < 0.05  # P(next label equal) ~ 1/K for K = 10 balanced classes
    long = make_stream(sel, scenario="iid", length=1500)
    assert len(long) == 1500 and np.bincount(long.indices, minlength=600).max() == 3


def _mean_run(conc, seeds=range(8)):
    sel = selection()
    return np.mean([run_lengths(make_stream(sel, scenario="class-sorted", concentration=conc, seed=s).labels).mean()
                    for s in seeds])


def test_class_sorted_runs_are_long_and_controlled_by_the_concentration():
    sel = selection()
    iid = np.mean([run_lengths(make_stream(sel, scenario="iid", seed=s).labels).mean() for s in range(8)])
    short, mid, long = _mean_run(100.0), _mean_run(0.1), _mean_run(0.01)  # about 6, 14, 32
    assert iid < 1.3  # i.i.d. runs: 1 / (1 - 1/K) ~ 1.11
    assert long > mid > short > 2 * iid  # smaller concentration => longer same-class runs
    assert long > 30  # near-sorted: runs of most of a class (60 images per class here)
    s = make_stream(sel, scenario="class-sorted", concentration=0.1)
    assert np.mean(s.labels[1:] == s.labels[:-1]) > 0.8  # strong lag-1 label autocorrelation
    assert np.array_equal(np.bincount(s.labels), np.bincount(sel.dataset.labels.numpy()))  # same labels, reordered


def test_gradual_mixed_and_shift_structure():
    sel = selection()
    g = make_stream(sel, scenario="gradual", sigma=0.8, sigma_start=0.1)
    assert g.sigma[0] == pytest.approx(0.1) and g.sigma[-1] == pytest.approx(0.8)
    assert np.all(np.diff(g.sigma) > 0)  # a monotone drift
    assert np.corrcoef(np.arange(len(g)), g.sigma)[0, 1] > 0.999
    m = make_stream(sel, scenario="mixed", sigmas=(0.0, 0.3, 0.6))
    counts = np.array([np.sum(m.sigma == v) for v in (0.0, 0.3, 0.6)])
    assert counts.sum() == len(m)
    chi2 = np.sum((counts - len(m) / 3) ** 2 / (len(m) / 3))
    assert chi2 < 13.8  # uniform over the levels (chi-square, 2 dof, p = 0.001)
    assert abs(np.mean(m.sigma[1:] == m.sigma[:-1]) - 1 / 3) < 0.08  # interleaved, not in blocks
    sh = make_stream(sel, scenario="shift", sigma=0.5, sigma_start=0.0, change_at=0.25)
    change = np.flatnonzero(np.diff(sh.sigma))
    assert list(change) == [149] and sh.sigma[0] == 0.0 and sh.sigma[-1] == 0.5


def test_noise_is_fixed_per_position_whatever_the_batch_size():
    z = unit_noise((1, 3, 3), 0, 0, 0, 700)
    parts = torch.cat([unit_noise((1, 3, 3), 0, 0, a, min(a + 97, 700)) for a in range(0, 700, 97)])
    assert torch.equal(z, parts)
    sel = selection()
    s = make_stream(sel, scenario="mixed")
    xs1 = torch.cat([x for *_, x, _ in stream_batches(sel.dataset, s, online_slices(len(s), 1), device=torch.device("cpu"))])
    xs64 = torch.cat([x for *_, x, _ in stream_batches(sel.dataset, s, online_slices(len(s), 64), device=torch.device("cpu"))])
    assert torch.equal(xs1, xs64)
    clean = sel.dataset.get(s.indices)[0]
    zero = torch.from_numpy(s.sigma == 0)
    assert torch.equal(xs1[zero], clean[zero]) and not torch.allclose(xs1[~zero], clean[~zero])


def test_bad_scenarios_and_unlabeled_data():
    sel = selection(labeled=False)
    assert make_stream(sel, scenario="iid").labels is None
    with pytest.raises(BnadaptError, match="labels") as e:
        make_stream(sel, scenario="class-sorted")
    assert "\n" not in str(e.value)
    with pytest.raises(BnadaptError, match="scenario"):
        make_stream(selection(), scenario="zigzag")
    with pytest.raises(BnadaptError, match="concentration"):
        make_stream(selection(), scenario="class-sorted", concentration=0)
    with pytest.raises(BnadaptError, match="change_at"):
        make_stream(selection(), scenario="shift", change_at=1.5)


def test_lengths_grid():
    assert lengths_grid(2000) == [50, 100, 200, 500, 1000, 2000]
    assert lengths_grid(30) == [30]
