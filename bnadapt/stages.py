"""The paper's protocol as stages (:mod:`bnadapt.reproduce` runs them): the sizes of the two protocols,
one planner per group that returns :class:`Stage` objects (each knows its inputs, how to run its one
library call, the result file it writes and the standalone command that gives the same result), and the
identities that make a stage's hash cover everything its numbers depend on (the corrupted set's
generation, the mCE reference)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from bnadapt.errors import check
from bnadapt.results import Result, inputs_sha256
from bnadapt.runs import resolve_device


GROUPS = ("noise", "certify", "attacks", "corruptions", "gradients", "stream")
ZOO_MODELS = ("zoo:baseline", "zoo:gaussian-0.5", "zoo:adv-linf-0.1", "zoo:adv-l2-1.5")

# Every size the protocols use; the report prints the chosen protocol's table and, for quick, what the
# paper used instead.
PROTOCOLS: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {
        "noise": {"images": None, "runs": 3, "batch_size": 512, "sigmas": [0.0, 0.25, 0.5, 0.75]},
        "sweep": {"images": 2000, "runs": 2, "sigma": 0.5, "batch_size": 512},
        "certify": {"images": 50, "per_class": 5, "n0": 100, "n": 2000, "alpha": 0.001, "sigmas": [0.25, 0.5, 0.75],
                    "calib_n": 512, "compile": False},
        "gradients": {"images": 4, "sigmas": [0.0, 0.25, 0.5, 0.75], "batch_size": 128},
        "attacks": {"images": 400, "per_class": 40, "batch_size": 200, "steps": 50, "runs": 1, "eot_m": [1, 5, 10]},
        "poison": {"images": 512, "qs": [0.1, 0.25], "rhos": [1.0, 0.5], "batch_sizes": [64, 512], "steps": 10,
                   "runs": 1, "trusted": 512},
        "corruptions": {"images": 1000, "runs": 2, "batch_size": 500, "workers": 2},
        "spectra": {"images": 100, "severity": 3, "batch_size": 100,
                    "corruptions": ["gaussian_noise", "impulse_noise", "defocus_blur", "zoom_blur", "fog", "contrast",
                                    "jpeg_compression"]},
        "stream": {"images": 2000, "runs": 1, "batch_sizes": [1, 8, 64], "sigma": 0.5,
                   "scenarios": ["iid", "class-sorted"]},
    },
    "full": {
        "noise": {"images": None, "runs": 5, "batch_size": 512, "sigmas": [0.0, 0.25, 0.5, 0.75]},
        "sweep": {"images": None, "runs": 5, "sigma": 0.5, "batch_size": 512},
        "certify": {"images": 500, "per_class": 50, "n0": 100, "n": 100_000, "alpha": 0.001,
                    "sigmas": [0.25, 0.5, 0.75], "calib_n": 512, "compile": True},
        "gradients": {"images": 8, "sigmas": [0.0, 0.25, 0.5, 0.75], "batch_size": 512},
        "attacks": {"images": 2000, "per_class": 200, "batch_size": 500, "steps": 100, "runs": 3, "eot_m": [1, 5, 10]},
        "poison": {"images": 2048, "qs": [0.01, 0.05, 0.1, 0.25], "rhos": [1.0, 0.5], "batch_sizes": [64, 512],
                   "steps": 100, "runs": 1, "trusted": 2048},
        "corruptions": {"images": None, "runs": 3, "batch_size": 512, "workers": 2},
        "spectra": {"images": 500, "severity": 3, "batch_size": 500, "corruptions": None},
        "stream": {"images": None, "runs": 3, "batch_sizes": [1, 2, 4, 8, 16, 64], "sigma": 0.5,
                   "scenarios": ["iid", "class-sorted", "gradual", "mixed", "shift"]},
    },
}
PAPER = {
    "noise": "all test images, 5 runs, batch 512",
    "sweep": "all test images, 5 runs",
    "certify": "500 images (at most 1 per class on ImageNet), n = 100,000, n0 = 100, alpha = 0.001",
    "gradients": "a few images (Fig. 2)",
    "attacks": "2,000 images (2 per ImageNet class), 100 iterations, 3 runs, batch 500, m = 1, 5, 10",
    "poison": "beyond the paper",
    "corruptions": "the whole ImageNet-C validation set per corruption and severity, 3 runs with adaptation",
    "spectra": "a few corruptions (Fig. 4)",
    "stream": "beyond the paper (its protocol: i.i.d. batches of 512)",
}


@dataclass
class Stage:
    """One step: ``run()`` returns a Result written to ``path``; ``inputs()`` computes its inputs cheaply."""

    name: str
    group: str
    path: Path
    inputs: Callable[[], dict]
    run: Callable[[], Result | None]
    distributed: bool = False
    note: str = ""
    extra: dict = field(default_factory=dict)
    commands: Callable[[], list[list[str]]] | None = None  # standalone command line(s) giving the same result


def adversarial(models) -> list:
    """The adversarially trained models (card recipe pgd-*), or all models when none says so."""
    adv = [m for m in models if str((m.card.get("recipe") or {}).get("name", "")).startswith("pgd")]
    return adv or list(models)


def plan(models: Sequence, data: str, out_dir: Path, protocol: str, *, device=None, seed: int = 0,
         quiet: bool = True, reference: str | None = "default", groups: Sequence[str] = GROUPS) -> list[Stage]:
    """The stages of ``groups`` (default all) for ``models`` (``LoadedModel``s) on ``data`` under
    ``protocol``, in order: 1. noise (Table 1, Tables 4-5), 2. certify, 3. attacks and poisoning,
    4. corruptions, 5. gradients and spectra, 6. streams. Each stage knows its inputs (hashed to skip
    it), how to run it, and the standalone command(s) that give the same result."""
    check(protocol in PROTOCOLS, f"unknown protocol {protocol!r}; use quick or full")
    P = PROTOCOLS[protocol]
    dev = resolve_device(device)
    adv = adversarial(models)
    stages: list[Stage] = []
    out_dir = Path(out_dir)
    cli = _Cli(models, data, out_dir, protocol, dev, seed, reference)
    if "noise" in groups:
        stages += _noise_stages(models, adv, data, out_dir, P, dev, seed, quiet, cli)
    if "certify" in groups:
        stages += _certify_stages(models, adv, data, out_dir, P, dev, seed, quiet, cli)
    if "attacks" in groups:
        stages += _attack_stages(adv, data, out_dir, P, dev, seed, quiet, cli)
    if "corruptions" in groups or "gradients" in groups:
        cor, spectra = _corruption_stages(models, adv, data, out_dir, P, dev, seed, quiet, reference, cli)
        stages += [cor] if "corruptions" in groups else []
        stages += [spectra] if "gradients" in groups else []
    if "gradients" in groups:
        stages += _gradient_stages(adv, data, out_dir, P, dev, seed, cli)
    if "stream" in groups:
        stages += _stream_stages(adv, data, out_dir, P, dev, seed, quiet, cli)
    return stages


def protocol_select(data: str, split: str = "test", *, images: int | None = None, per_class: int | None = None):
    """A protocol's subset of ``data``: ``images`` of them (at most ``per_class`` per class) as
    :func:`bnadapt.data.select` picks them, the count capped at what the data holds under that cap, so a
    set smaller than the protocol's size is used whole instead of refused (the selection, and so the
    result's ``data.n`` and the stage's standalone command, record the count used)."""
    from bnadapt.data import select

    if images is None:
        return select(data, split, per_class=per_class)
    whole = select(data, split, per_class=per_class)
    return select(data, split, images=min(images, len(whole)), per_class=per_class, dataset=whole.dataset)


# ----------------------------------------------------------------------------------------- commands
def _arg(v: Any) -> str:
    """One option value as the command line spells it: numbers without noise, lists comma-separated."""
    if isinstance(v, (list, tuple)):
        return ",".join(_arg(x) for x in v)
    if isinstance(v, float):
        short = f"{v:g}"
        return short if float(short) == v else repr(v)
    return str(v)


def _opts(*pairs: tuple[str, Any]) -> list[str]:
    """``--name value`` for each pair whose value is not None (``True``: the bare flag)."""
    out: list[str] = []
    for name, value in pairs:
        if value is None or value is False:
            continue
        out += [name] if value is True else [name, _arg(value)]
    return out


def model_spec(m) -> str:
    """How a command line names a loaded model: ``zoo:NAME`` for a shipped model (its file's absolute
    path names one checkout and cannot be run elsewhere), else the spec it was loaded from."""
    from bnadapt.models.checkpoint import ZOO_DIR

    p = Path(m.source)
    if p.suffix == ".safetensors" and p.parent.resolve() == ZOO_DIR.resolve():
        return f"zoo:{p.stem}"
    return m.source


@dataclass
class _Cli:
    """What every stage's standalone command shares: the models, data, device and seed."""

    models: Sequence
    data: str
    out_dir: Path
    protocol: str
    device: Any
    seed: int
    reference: str | None

    def models_args(self, models: Sequence) -> list[str]:
        return [a for m in models for a in ("--model", model_spec(m))]

    def run(self, *words: str, models: Sequence = ()) -> list[str]:
        """``bnadapt WORDS --model ...`` (the command and its models; the stage adds the rest)."""
        return ["bnadapt", *words, *self.models_args(models)]

    def common(self) -> list[str]:
        return _opts(("--seed", self.seed), ("--device", str(self.device)))

    def reproduce(self, *more: str) -> list[str]:
        """The ``bnadapt reproduce`` call that redoes one stage alone (for stages without a command)."""
        return (["bnadapt", "reproduce", *self.models_args(self.models), "--data", self.data,
                 "--full" if self.protocol == "full" else "--quick"]
                + _opts(("--reference", "none" if self.reference is None else
                         None if self.reference == "default" else self.reference))
                + self.common() + list(more) + ["--out", str(self.out_dir)])


def _stream_stages(adv, data, out_dir, P, dev, seed, quiet, cli) -> list[Stage]:
    """Online adaptation over test streams (beyond the paper), per scenario."""
    from bnadapt.data import select
    from bnadapt.stream.evaluate import stream_evaluation

    ps = P["stream"]
    sel = select(data, images=ps["images"])
    eager = [m for m in adv if not m.is_torchscript]
    if not eager:
        return []
    out = []
    for scenario in ps["scenarios"]:
        if scenario == "class-sorted" and sel.dataset.labels is None:
            continue
        kw = dict(batch_sizes=ps["batch_sizes"], runs=ps["runs"], sigma=ps["sigma"], scenario=scenario, seed=seed,
                  device=dev)
        path = out_dir / "stream" / f"{scenario}.json"

        def inputs(kw=kw):
            from bnadapt.results import make_inputs

            return make_inputs(models=[m.describe() for m in eager], data=sel.describe(),
                               params={k: v for k, v in kw.items() if k != "device"}, seed=seed, device=dev)

        def commands(kw=kw, path=path):
            return [cli.run("stream", models=eager) + ["--data", data]
                    + _opts(("--images", ps["images"]), ("--batch-sizes", kw["batch_sizes"]), ("--runs", kw["runs"]),
                            ("--sigma", kw["sigma"]), ("--scenario", kw["scenario"]))
                    + cli.common() + ["--out", str(path)]]

        out.append(Stage(f"stream_{scenario}", "stream", path, inputs,
                         (lambda kw=kw: stream_evaluation(eager, sel, quiet=quiet, **kw)), commands=commands))
    return out


def _noise_stages(models, adv, data, out_dir, P, dev, seed, quiet, cli) -> list[Stage]:
    from bnadapt import noise as N

    stages = []
    pn = P["noise"]
    sel_n = protocol_select(data, images=pn["images"])
    kw_n = dict(sigmas=pn["sigmas"], rho=1.0, batch_size=pn["batch_size"], runs=pn["runs"], seed=seed, device=dev)
    table1 = out_dir / "noise" / "table1.json"
    stages.append(Stage("noise", "noise", table1, lambda: N.noise_inputs(models, sel_n, **kw_n),
                        lambda: N.noise_table(models, sel_n, quiet=quiet, **kw_n),
                        commands=lambda: [cli.run("noise", models=models) + ["--data", data]
                                          + _opts(("--images", sel_n.images), ("--sigmas", kw_n["sigmas"]),
                                                  ("--rho", kw_n["rho"]), ("--batch-size", kw_n["batch_size"]),
                                                  ("--runs", kw_n["runs"]))
                                          + cli.common() + ["--out", str(table1)]]))
    ps = P["sweep"]
    sel_s = protocol_select(data, images=ps["images"])
    for over, fname in (("rho", "table4_rho.json"), ("batch-size", "table5_batch.json")):
        kw_s = dict(over=over, sigma=ps["sigma"], rho=1.0, batch_size=ps["batch_size"], runs=ps["runs"], seed=seed,
                    device=dev)
        path = out_dir / "noise" / fname

        def commands(kw=kw_s, path=path):
            return [cli.run("sweep", kw["over"], models=adv) + ["--data", data]
                    + _opts(("--images", sel_s.images), ("--sigma", kw["sigma"]),
                            ("--rho", kw["rho"] if kw["over"] == "batch-size" else None),
                            ("--batch-size", kw["batch_size"]), ("--runs", kw["runs"]))
                    + cli.common() + ["--out", str(path)]]

        stages.append(Stage(f"sweep_{over}", "noise", path,
                            (lambda kw=kw_s: N.sweep_inputs(adv, sel_s, **kw)),
                            (lambda kw=kw_s: N.sweep(adv, sel_s, quiet=quiet, **kw)), commands=commands))

    return stages


def _certify_stages(models, adv, data, out_dir, P, dev, seed, quiet, cli) -> list[Stage]:
    from bnadapt.data import select

    stages = []
    pc = P["certify"]
    sel_c = select(data, images=pc["images"], per_class=pc["per_class"])
    for m in models:
        for adapt in ((True, False) if (m in adv and not m.is_torchscript) else (False,)):
            kw_c = dict(sigmas=pc["sigmas"], adapt=adapt, calib_n=pc["calib_n"], n0=pc["n0"], n=pc["n"],
                        alpha=pc["alpha"], seed=seed, device=dev, compile=pc["compile"])
            tag = "adapt" if adapt else "noadapt"
            stages.append(_certify_stage(m, sel_c, out_dir / "certify", tag, kw_c, quiet, cli, data, pc))

    return stages


def _attack_stages(adv, data, out_dir, P, dev, seed, quiet, cli) -> list[Stage]:
    """Tables 2 and 7 and batch poisoning, on the models whose card names a threat model."""
    from bnadapt.attacks.evaluate import Protocol, attack_table, model_threat, rows_path
    from bnadapt.data import select

    stages = []
    from bnadapt.attacks.poison_table import poison_table

    armed = [m for m in adv if (m.card.get("recipe") or {}).get("threat_model") and not m.is_torchscript]
    if armed:
        pa, pp = P["attacks"], P["poison"]
        proto = Protocol(batch_size=pa["batch_size"], runs=pa["runs"], steps=pa["steps"], eot_m=tuple(pa["eot_m"]))
        sel_a = select(data, images=pa["images"], per_class=pa["per_class"])
        sel_p = select(data, images=pp["images"])
        # trusted images for the immune reference (adapt-then-freeze): the training split, when the data has one
        trusted = select(data, "train", images=pp["trusted"]) if pp["trusted"] and sel_p.dataset.has_splits else None
        folder = out_dir / "attacks"

        def threats():
            return [model_threat(m).describe() for m in armed]

        def att_inputs():
            from dataclasses import asdict

            from bnadapt.results import make_inputs

            return make_inputs(models=[m.describe() for m in armed], data=sel_a.describe(),
                               params={"protocol": asdict(proto.validated()), "threats": threats()}, seed=seed,
                               device=dev)

        def att_run():
            rows = rows_path(folder / f"table2_{inputs_sha256(att_inputs())[:10]}.json")
            return attack_table(armed, sel_a, rows, protocol=proto, seed=seed, device=dev, resume=rows.exists(),
                                quiet=quiet)

        def att_commands():
            p = proto.validated()
            return [cli.run("attack", models=armed) + ["--data", data]
                    + _opts(("--images", pa["images"]), ("--per-class", pa["per_class"]), ("--rho", p.rho),
                            ("--batch-size", p.batch_size), ("--runs", p.runs), ("--steps", p.steps),
                            ("--restarts", p.restarts), ("--step-size", p.step_size), ("--eot-m", list(p.eot_m)),
                            ("--attacks", list(p.adapted) or "none"), ("--no-adapt-attacks", list(p.plain) or "none"))
                    + cli.common() + ["--out", str(folder / "table2_7.json")]]

        kw_p = dict(qs=pp["qs"], rhos=pp["rhos"], batch_sizes=pp["batch_sizes"], steps=pp["steps"], runs=pp["runs"])

        def poi_inputs():
            import inspect

            from bnadapt.results import make_inputs

            # the poisoner's own defaults (loss, step schedule, start, ...) are part of what the numbers depend on
            sig = inspect.signature(poison_table).parameters
            poisoner = {k: sig[k].default for k in ("restarts", "loss", "schedule", "start", "transfer", "robusts")}
            return make_inputs(models=[m.describe() for m in armed], data=sel_p.describe(),
                               params=dict(kw_p, poisoner=poisoner,
                                           trusted=None if trusted is None else trusted.describe()),
                               seed=seed, device=dev)  # the threat models: in the models' descriptions (cards)

        def poi_run():
            rows = rows_path(folder / f"poison_{inputs_sha256(poi_inputs())[:10]}.json")
            return poison_table(armed, sel_p, rows, trusted=trusted, seed=seed, device=dev, resume=rows.exists(),
                                quiet=quiet, **kw_p)

        def poi_commands():
            return [cli.run("poison", models=armed) + ["--data", data]
                    + _opts(("--images", pp["images"]), ("--qs", kw_p["qs"]), ("--rhos", kw_p["rhos"]),
                            ("--batch-sizes", kw_p["batch_sizes"]), ("--steps", kw_p["steps"]),
                            ("--runs", kw_p["runs"]), ("--trusted", 0 if trusted is None else pp["trusted"]))
                    + cli.common() + ["--out", str(folder / "poison.json")]]

        stages.append(Stage("attacks", "attacks", folder / "table2_7.json", att_inputs, att_run, distributed=True,
                            commands=att_commands))
        stages.append(Stage("poison", "attacks", folder / "poison.json", poi_inputs, poi_run, distributed=True,
                            commands=poi_commands))

    return stages


def generation_identity(sel, seed: int) -> dict:
    """Everything the bytes of the stage's corrupted set depend on: the cache's identity (severity table,
    library and version, seed, protocol text, source data with its content hash, image shape, severities;
    :mod:`bnadapt.corruptions.generate`), exactly what the cache itself compares."""
    import torch

    from bnadapt.corruptions.generate import _identity

    return _identity(sel, "imagenet", "library", seed, torch.device("cpu"))


def _corruption_stages(models, adv, data, out_dir, P, dev, seed, quiet, reference, cli) -> tuple[Stage, Stage]:
    """Tables 3 and 8, and the spectra of the same corrupted set (Fig. 4)."""
    from functools import lru_cache

    from bnadapt.corruptions.evaluate import reference_identity, reference_spec, refresh_reference

    from bnadapt import gradients as G
    from bnadapt.data import select

    pk = P["corruptions"]
    sel_k = select(data, images=pk["images"])
    generation = generation_identity(sel_k, seed)
    # named by the identity: a changed generation request makes a new set instead of clashing with the old one
    cache_dir = (out_dir / "corrupted" / f"{sel_k.dataset.name.replace('/', '-')}-{len(sel_k)}img-seed{seed}-"
                 f"{inputs_sha256(generation)[:8]}")
    gen_kw = dict(workers=pk["workers"], seed=seed, quiet=quiet)
    ref = reference_spec(reference, sel_k)
    ev_kw = dict(rho=1.0, batch_size=pk["batch_size"], runs=pk["runs"], seed=seed, device=dev, quiet=quiet,
                 reference=ref)
    ref_identity = lru_cache(maxsize=1)(lambda: reference_identity(ref))
    path = out_dir / "corruptions" / "tables3_8.json"

    def corrupted():
        from bnadapt.corruptions.generate import generate
        from bnadapt.data.corrupted import open_corrupted

        generate(sel_k, cache_dir, **gen_kw)  # cached: reused once finished, completed when interrupted
        return open_corrupted("cifar10-c", cache_dir)

    def cor_inputs():
        from bnadapt.results import make_inputs

        # workers are left out: the bytes do not depend on them (generate's guarantee)
        return make_inputs(models=[m.describe() for m in models], data=sel_k.describe(),
                           params={"generation": generation,
                                   "evaluation": {k: v for k, v in ev_kw.items()
                                                  if k not in ("device", "quiet", "reference")},
                                   "reference": ref_identity()},
                           seed=seed, device=dev)

    def cor_run():
        from bnadapt.corruptions.evaluate import evaluate_set

        cset = corrupted()
        refresh_reference(cset, ref, batch_size=pk["batch_size"], device=dev, quiet=quiet)
        return evaluate_set(models, cset, **ev_kw)[0]

    def cor_commands():
        return [["bnadapt", "corruptions", "generate", "--data", data]
                + _opts(("--images", pk["images"]), ("--seed", seed), ("--workers", pk["workers"]))
                + ["--out", str(cache_dir)],
                cli.run("corruptions", "evaluate", models=models) + ["--data", f"cifar10-c:{cache_dir}"]
                + _opts(("--rho", ev_kw["rho"]), ("--batch-size", ev_kw["batch_size"]), ("--runs", ev_kw["runs"]),
                        ("--reference", ref))
                + cli.common() + ["--out", str(path)]]

    cor = Stage("corruptions", "corruptions", path, cor_inputs, cor_run, commands=cor_commands)

    ps = P["spectra"]
    linf = [m for m in adv if (m.card.get("recipe") or {}).get("threat_model") == "linf"] or adv
    sp_kw = dict(corruptions=ps["corruptions"], severity=ps["severity"], images=ps["images"],
                 batch_size=ps["batch_size"], seed=seed, device=dev)
    sp_npz = out_dir / "gradients" / "spectra.npz"

    def sp_inputs():
        from bnadapt.results import make_inputs

        # the spectra are of the same corrupted set: its generation, its images, the model, the parameters
        return make_inputs(models=[linf[0].describe()], data=sel_k.describe(),
                           params={"generation": generation,
                                   "spectra": {k: v for k, v in sp_kw.items() if k != "device"}},
                           seed=seed, device=dev)

    def sp_run():
        from bnadapt.corruptions.evaluate import clean_set

        cset = corrupted()
        return G.corruption_spectra(linf[0], cset, clean_set(cset), sp_npz, **sp_kw)

    return cor, Stage("spectra", "gradients", out_dir / "gradients" / "spectra.json", sp_inputs, sp_run,
                      commands=lambda: [cli.reproduce("--stages", "gradients", "--force", "spectra")])


def _gradient_stages(adv, data, out_dir, P, dev, seed, cli) -> list[Stage]:
    from bnadapt import gradients as G
    from bnadapt.data import select

    pg = P["gradients"]
    sel_g = select(data, images=max(pg["batch_size"], pg["images"]))
    kw_g = dict(sigmas=pg["sigmas"], images=pg["images"], batch_size=pg["batch_size"], seed=seed, device=dev)
    npz = out_dir / "gradients" / "gradient_maps.npz"
    return [Stage("gradients", "gradients", out_dir / "gradients" / "gradient_maps.json",
                  lambda: G.gradient_maps_inputs(adv, sel_g, **kw_g), lambda: G.gradient_maps(adv, sel_g, npz, **kw_g),
                  commands=lambda: [cli.reproduce("--stages", "gradients", "--force", "gradients")])]


def _certify_stage(m, sel, folder: Path, tag: str, kw: dict, quiet: bool, cli, data: str, pc: dict) -> Stage:
    from bnadapt import certify as C

    def inputs():
        return C.certify_plan_inputs(m, sel, **kw)

    # The rows file is named by the inputs hash, so a changed protocol never resumes a stale file.
    tsv = lambda: folder / f"{m.name}.{tag}.{inputs_sha256(inputs())[:10]}.tsv"  # noqa: E731

    def run():
        path = tsv()
        return C.certify(m, sel, path, resume=path.exists(), quiet=quiet, **kw)

    def commands():  # its summary X.json is the stage's file
        return [cli.run("certify", models=[m]) + ["--data", data]
                + _opts(("--images", pc["images"]), ("--per-class", pc["per_class"]), ("--sigmas", kw["sigmas"]),
                        ("--adapt", kw["adapt"]), ("--calib-n", kw["calib_n"] if kw["adapt"] else None),
                        ("--n0", kw["n0"]), ("--samples", kw["n"]), ("--alpha", kw["alpha"]),
                        ("--no-compile", not kw["compile"]))
                + cli.common() + ["--out", str(folder / f"{m.name}.{tag}.tsv")]]

    return Stage(f"certify/{m.name}/{tag}", "certify", folder / f"{m.name}.{tag}.json", inputs, run, distributed=True,
                 commands=commands)
