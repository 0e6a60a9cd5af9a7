import json

import numpy as np
import pytest
import torch

import bnadapt.train as T
import bnadapt.train_files as TF
from bnadapt.data.base import TensorImageDataset
from bnadapt.errors import BnadaptError
from bnadapt.card import evaluate_card
from bnadapt.models import load_model

TINY = {"widths": [4, 8, 8], "depth": 1}
PGD_FAST = {"steps": 2}


def datasets(n_train: int = 320, n_test: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tr = TensorImageDataset(torch.randint(0, 256, (n_train, 1, 28, 28), dtype=torch.uint8, generator=g),
                            torch.randint(0, 10, (n_train,), generator=g), name="random/train")
    te = TensorImageDataset(torch.randint(0, 256, (n_test, 1, 28, 28), dtype=torch.uint8, generator=g),
                            torch.randint(0, 10, (n_test,), generator=g), name="random/test")
    return tr, te


def tiny_train(recipe, out, **kw):
    tr, te = datasets()
    kw.setdefault("epochs", 2)
    kw.setdefault("val_size", 64)
    if recipe.startswith("pgd"):
        kw.setdefault("steps", 2)
    return T.train(recipe, out, train_dataset=tr, test_dataset=te, arch_args=TINY, progress=False,
                   log=lambda msg: None, **kw)


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("recipe,kw,keys", [
    ("standard", {}, {"clean_acc"}),
    ("gaussian", {"sigma": 0.5}, {"clean_acc", "noise_acc_0.5"}),
    ("pgd-linf", {"eps": 0.1}, {"clean_acc", "pgd_acc"}),
    ("pgd-l2", {"eps": 1.5}, {"clean_acc", "pgd_acc"}),
])
def test_each_recipe_writes_a_loadable_checkpoint(tmp_path, recipe, kw, keys):
    res = tiny_train(recipe, tmp_path / "m.safetensors", eval_limit=32, **kw)
    assert res.completed and res.path == tmp_path / "m.safetensors"
    loaded = load_model(str(res.path))
    card = loaded.card
    assert card["arch"] == "preact_resnet" and card["input_shape"] == [1, 28, 28]
    assert card["arch_args"]["widths"] == [4, 8, 8] and card["normalization"]["mean"] == [0.5]
    assert len(card["class_names"]) == 10
    r = card["recipe"]
    assert r["name"] == recipe and r["epochs"] == 2 and r["batch_size"] == 128 and r["seed"] == 0
    assert r["val_size"] == 64 and r["best_epoch"] in (1, 2)
    if recipe.startswith("pgd"):
        assert (r["eps"], r["steps"]) == (kw["eps"], 2) and r["step_size"] == pytest.approx(2.5 * kw["eps"] / 2)
    assert set(card["metrics"]) == keys and all(0.0 <= v <= 1.0 for v in card["metrics"].values())
    assert keys <= set(card["metrics_protocol"]) and card["metrics_protocol"]["images"] == 32
    assert card["eval_limit"] == 32
    t = card["training"]
    assert t["wall_time_s"] >= 0 and t["machine"]["cpu_count"] and t["torch"] == torch.__version__
    assert len(t["history"]) == 2
    assert not TF.resume_path(res.path).exists()  # removed once the checkpoint is complete
    # the card's metrics are re-measurable
    _, te = datasets()
    again = T.evaluate_metrics(loaded.model, recipe, te, eps=r["eps"], sigma=r["sigma"], limit=32)
    assert again == card["metrics"]
    assert evaluate_card(loaded, te, limit=32) == card["metrics"]


@pytest.mark.parametrize("recipe,val_size", [("pgd-linf", 0), ("gaussian", 0), ("pgd-l2", 64)])
def test_resume_equals_uninterrupted(tmp_path, recipe, val_size):
    # val_size 0 keeps the last epoch, so the final weights are those trained after the resume
    full = tiny_train(recipe, tmp_path / "full", val_size=val_size)
    part = tiny_train(recipe, tmp_path / "part", stop_after=1, val_size=val_size)
    assert not part.completed and part.path is None
    assert TF.resume_path(tmp_path / "part").exists()
    assert not (tmp_path / "part.safetensors").exists()
    resumed = tiny_train(recipe, tmp_path / "part", resume=True, val_size=val_size)
    if val_size == 0:
        assert resumed.best_epoch == 2
    a = load_model(str(full.path))
    b = load_model(str(resumed.path))
    assert states_equal(a.model.state_dict(), b.model.state_dict())
    assert a.card["metrics"] == b.card["metrics"]
    assert a.card["recipe"]["best_epoch"] == b.card["recipe"]["best_epoch"]
    assert [h["train_loss"] for h in full.history] == [h["train_loss"] for h in resumed.history]


def test_interrupted_run_leaves_no_checkpoint_and_resumes_identically(tmp_path, monkeypatch):
    out = tmp_path / "m.safetensors"
    real_step = T.training_step
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # the first batch of epoch 2 (2 batches per epoch)
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(T, "training_step", flaky)
    with pytest.raises(KeyboardInterrupt):
        tiny_train("pgd-l2", out, val_size=0)
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert TF.resume_path(out).exists()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    monkeypatch.setattr(T, "training_step", real_step)
    # a fresh run refuses to overwrite the resume state; --resume continues it
    with pytest.raises(BnadaptError, match="--resume"):
        tiny_train("pgd-l2", out, val_size=0)
    resumed = tiny_train("pgd-l2", out, resume=True, val_size=0)
    full = tiny_train("pgd-l2", tmp_path / "full", val_size=0)
    assert resumed.best_epoch == full.best_epoch == 2
    assert states_equal(load_model(str(resumed.path)).model.state_dict(), load_model(str(full.path)).model.state_dict())


def test_interrupted_during_final_save_leaves_nothing_loadable(tmp_path, monkeypatch):
    import bnadapt.models.checkpoint as ck

    def boom(path, data):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "atomic_write_bytes", boom)
    with pytest.raises(KeyboardInterrupt):
        tiny_train("standard", tmp_path / "m", epochs=1)
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("change,word", [({"seed": 1}, "seed"), ({"eps": 0.2}, "eps"),
                                         ({"lr": 0.05}, "lr"), ({"epochs": 3}, "epochs")])
def test_mismatched_resume_is_refused(tmp_path, change, word):
    tiny_train("pgd-linf", tmp_path / "m", stop_after=1, eps=0.1)
    kw = {"eps": 0.1, **change}
    with pytest.raises(BnadaptError) as e:
        tiny_train("pgd-linf", tmp_path / "m", resume=True, **kw)
    msg = str(e.value)
    assert "\n" not in msg and word in msg and "delete it" in msg


def test_resume_from_other_recipe_is_refused(tmp_path):
    tiny_train("standard", tmp_path / "m", stop_after=1)
    with pytest.raises(BnadaptError, match="recipe"):
        tiny_train("gaussian", tmp_path / "m", resume=True)


@pytest.fixture
def npz(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, size=(300, 12, 12, 1), dtype=np.uint8),
             y=rng.integers(0, 10, size=300))
    return str(tmp_path / "d.npz")


def run_cli(capsys, *argv):
    from bnadapt.cli import main

    code = main(["train", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_trains_and_resume_mismatch_exits_2(tmp_path, npz, capsys):
    out = str(tmp_path / "c.safetensors")
    common = ["--data", npz, "--epochs", "2", "--val-size", "40", "--eval-limit", "20", "--no-progress"]
    code, _, err = run_cli(capsys, "standard", "--out", out, *common, "--stop-after", "1")
    assert code == 0 and TF.resume_path(out).exists()
    code, _, err = run_cli(capsys, "standard", "--out", out, *common, "--resume", "--seed", "3")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "seed" in err
    code, stdout, _ = run_cli(capsys, "standard", "--out", out, *common, "--resume")
    assert code == 0 and "clean_acc" in stdout
    card = json.loads((tmp_path / "c.json").read_text())
    assert card["input_shape"] == [1, 12, 12] and card["recipe"]["data"] == npz and card["eval_limit"] == 20


@pytest.mark.parametrize("argv,word", [
    (["adversarial"], "unknown recipe"),
    (["pgd-linf", "--eps", "0"], "--eps"),
    (["pgd-l2", "--eps", "-1"], "--eps"),
    (["pgd-linf", "--steps", "0"], "--steps"),
    (["pgd-linf", "--step-size", "0"], "--step-size"),
    (["gaussian", "--sigma", "-0.1"], "--sigma"),
    (["standard", "--epochs", "0"], "--epochs"),
    (["standard", "--epochs", "two"], "epochs"),
    (["standard", "--eps", "0.1"], "--eps"),
    (["standard", "--batch-size", "1"], "--batch-size"),
    (["standard", "--val-size", "-1"], "--val-size"),
    (["standard", "--eval-limit", "0"], "--eval-limit"),
    (["standard", "--seed", "-1"], "--seed"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, npz, capsys, argv, word):
    code, _, err = run_cli(capsys, *argv, "--out", str(tmp_path / "x"), "--data", npz, "--no-progress")
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and word in err
    assert not list(tmp_path.glob("x*"))


def test_val_size_too_large_and_missing_out_folder(tmp_path, npz, capsys):
    code, _, err = run_cli(capsys, "standard", "--out", str(tmp_path / "x"), "--data", npz, "--val-size", "300")
    assert code == 2 and "val size" in err
    (tmp_path / "dir.safetensors").mkdir()
    code, _, err = run_cli(capsys, "standard", "--out", str(tmp_path / "dir.safetensors"), "--data", npz)
    assert code == 2 and "folder" in err


def test_pieces():
    total = 100
    lrs = [T.lr_at(s, total, 0.2) for s in range(total)]
    assert lrs[0] < 0.01 and max(lrs) == pytest.approx(0.2, rel=0.02) and lrs[-1] < 0.01
    assert int(np.argmax(lrs)) in (39, 40)
    x = torch.rand(8, 1, 28, 28)
    a = T.augment(x, torch.Generator().manual_seed(0))
    b = T.augment(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    tr, va = T.split_indices(100, 10)
    assert len(tr) == 90 and len(va) == 10 and not set(tr) & set(va)
    assert np.array_equal(va, T.split_indices(100, 10)[1])
    cfg = T.make_config("pgd-l2")
    assert (cfg.eps, cfg.steps) == (1.5, 7) and cfg.step_size == pytest.approx(2.5 * 1.5 / 7)
    assert T.make_config("gaussian").sigma == 0.5


@pytest.mark.parametrize("out", ["gaussian-0.5", "gaussian-0.5.safetensors", "gaussian-0.5.json"])
def test_dotted_names_keep_their_dots(tmp_path, out):
    assert TF.weights_path(tmp_path / out) == tmp_path / "gaussian-0.5.safetensors"
    assert TF.resume_path(tmp_path / out) == tmp_path / "gaussian-0.5.resume.pt"
    if out == "gaussian-0.5":
        res = tiny_train("gaussian", tmp_path / out, epochs=1, stop_after=None)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["gaussian-0.5.json", "gaussian-0.5.safetensors"]
        assert res.card["name"] == "gaussian-0.5"
