"""The ``pyvarinf2`` command and pyvarinf2.experiments: quickstart, bad input, resume, evaluate,
regression-table, configs."""
import csv
import importlib
import importlib.util
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from pyvarinf2 import cli, experiments as ex, metrics
from pyvarinf2.data import UCI_DATASETS, IMAGE_DATASETS

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ["--no-progress", "--train-subset", "60", "--batch-size", "10", "--eval-samples", "2",
        "--test-samples", "5"]


def _run(argv, capsys):
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as exc:              # argparse's own usage errors (exit code 2)
        rc = exc.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ------------------------------------------------------------------------------ quickstart
def test_quickstart_one_command_no_network_no_data_dir(tmp_path):
    """The README command: `pyvarinf2 train` on a fresh machine, shipped data, < 1 minute."""
    exe = pathlib.Path(sys.executable).with_name("pyvarinf2")
    cmd = [str(exe), "train"] if exe.exists() else [sys.executable, "-m", "pyvarinf2", "train"]
    env = {k: v for k, v in os.environ.items() if k != "PYVARINF2_DATA"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r"test RMSE ([-\d.]+)\s+test log-likelihood ([-\d.]+)", proc.stdout)
    assert m, proc.stdout
    rmse, ll = float(m.group(1)), float(m.group(2))
    # yacht's target has std ~15; predicting the mean gives RMSE ~15, log-lik ~ -4.1
    assert rmse < 4.0 and ll > -3.5, (rmse, ll)
    assert elapsed < 60, elapsed
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("quickstart-")
    with open(run / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 200 and rows[-1]["epoch"] == "200"
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["test_rmse"] == pytest.approx(rmse, abs=1e-4)
    assert "data from " + str(pathlib.Path(ex.__file__).parent / "datasets") in proc.stdout


def test_shipped_quickstart_config_is_the_generated_one():
    shipped = json.loads(ex.QUICKSTART_CONFIG.read_text())
    assert shipped == ex.quickstart_config("bbb")
    assert shipped == json.loads((ROOT / "configs" / "quickstart" / "bbb_embedded.json")
                                 .read_text())


def test_help_and_module_entry_point(capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["--help"])
    assert err.value.code == 0
    assert "regression-table" in capsys.readouterr().out
    main_mod = importlib.import_module("pyvarinf2.__main__")
    assert main_mod.main is cli.main


# ------------------------------------------------------------------------------ bad input
def _bad_configs(tmp_path):
    (tmp_path / "malformed.json").write_text('{"dataset": "yacht",\n')
    (tmp_path / "list.json").write_text('[1, 2]')
    (tmp_path / "unknown_key.json").write_text('{"datset": "yacht"}')
    (tmp_path / "bad_type.json").write_text('{"epochs": "ten"}')
    (tmp_path / "bad_hidden.json").write_text('{"model": {"hidden": [0]}}')
    (tmp_path / "model_list.json").write_text('{"model": [1, 2]}')
    (tmp_path / "optimizer_text.json").write_text('{"optimizer": "adam"}')
    (tmp_path / "activation_list.json").write_text('{"model": {"activation": ["relu"]}}')
    (tmp_path / "afile").write_text("a file, not a directory")
    (tmp_path / "adam_eps.json").write_text('{"method": "map", "optimizer": {"eps": "x"}}')
    return tmp_path


BAD = [
    (["--config", "{tmp}/missing.json"], ["config file not found", "missing.json"]),
    (["--config", "{tmp}/malformed.json"], ["malformed JSON", "malformed.json", "line 2"]),
    (["--config", "{tmp}/list.json"], ["must hold a JSON object", "list.json"]),
    (["--config", "{tmp}/unknown_key.json"], ["unknown config key", "datset"]),
    (["--config", "{tmp}/bad_type.json"], ["'epochs'", "'ten'"]),
    (["--config", "{tmp}/bad_hidden.json"], ["model.hidden"]),
    (["--dataset", "cifar10"], ["unknown dataset 'cifar10'"]),
    (["--method", "sgd"], ["unknown method 'sgd'"]),
    (["--dataset", "mnist", "--data-dir", "{tmp}/empty"],
     ["'mnist' not found in data directory", "empty/mnist/train-images-idx3-ubyte.gz"]),
    (["--dataset", "concrete", "--data-dir", "{tmp}/empty"],
     ["'concrete' not found", "empty/uci/concrete/data/data.txt"]),
    (["--split", "20"], ["split 20 does not exist"]),
    (["--lr", "-1"], ["optimizer.lr", "-1"]),
    (["--opt", "momentum=0.9"], ["['momentum']", "'bbb'"]),
    (["--epochs", "0"], ["'epochs'"]),
    (["--device", "tpu"], ["'device'"]),
    (["--prior-std", "0"], ["bad prior"]),
    (["--config", "{tmp}/model_list.json"], ["'model' must be an object", "[1, 2]"]),
    (["--config", "{tmp}/optimizer_text.json"], ["'optimizer' must be an object", "'adam'"]),
    (["--config", "{tmp}/activation_list.json"], ["model.activation", "['relu']"]),
    (["--method", "map", "--opt", "betas=[0.9]"], ["betas must be two numbers", "[0.9]"]),
    (["--seed", str(2 ** 32)], ["'seed'", "2**32 - 1"]),
    (["--resume", "--overwrite"], ["contradict"]),
    (["-o", "{tmp}/afile/sub"], ["afile exists and is not a directory"]),
    (["--config", "{tmp}/adam_eps.json"], ["eps must be a number", "'x'"]),
]


@pytest.mark.parametrize("argv,needles", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, argv, needles):
    _bad_configs(tmp_path)
    (tmp_path / "empty").mkdir()
    out_dir = tmp_path / "out"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc, out, err = _run(["train", "-o", out_dir, "--no-progress"] + argv, capsys)
    assert rc == 2
    assert err.startswith("pyvarinf2 train: error: ")
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out_dir.exists()


def test_unusable_cuda_device_is_bad_input(tmp_path, capsys):
    if torch.cuda.is_available():
        device, needle = "cuda:99", "CUDA device(s) exist"
    else:
        device, needle = "cuda", "CUDA is not available"
    rc, _, err = _run(["train", "-o", tmp_path / "o", "--device", device], capsys)
    assert rc == 2 and needle in err and not (tmp_path / "o").exists()


def test_missing_optimizer_module_is_bad_input(tmp_path, capsys, monkeypatch):
    import pyvarinf2.optim as optim
    monkeypatch.delitem(vars(optim), "VOGN", raising=False)  # forget a cached import
    monkeypatch.setitem(optim._LOCATIONS, "VOGN", ".does_not_exist")
    rc, _, err = _run(["train", "-o", tmp_path / "o", "--method", "vogn"], capsys)
    assert rc == 2 and "pyvarinf2.optim.VOGN" in err and not (tmp_path / "o").exists()


def test_other_commands_bad_input(tmp_path, capsys):
    rc, _, err = _run(["evaluate", tmp_path / "nothing"], capsys)
    assert rc == 2 and "checkpoint not found" in err and str(tmp_path / "nothing") in err
    for seed in (-1, 2 ** 32):
        rc, _, err = _run(["evaluate", tmp_path / "nothing", "--seed", seed], capsys)
        assert rc == 2 and "--seed must be in [0, 2**32 - 1]" in err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    rc, _, err = _run(["evaluate", tmp_path / "junk.pt", "-o", tmp_path / "ev"], capsys)
    assert rc == 2 and "cannot read checkpoint" in err and not (tmp_path / "ev").exists()
    for argv, needle in ((["--datasets", "cifar"], "unknown UCI dataset 'cifar'"),
                         (["--methods", "sgd"], "unknown method 'sgd'"),
                         (["--datasets", "yacht", "--data-dir", tmp_path / "e"],
                          "'yacht' not found"),
                         (["--splits", "0"], "--splits"),
                         (["--datasets", "yacht,yacht"], "['yacht'] given more than once"),
                         (["--methods", "map,bbb,map"], "['map'] given more than once"),
                         (["--datasets", ""], "expected a comma-separated list"),
                         (["--config-dir", tmp_path / "nope"], "--config-dir")):
        rc, _, err = _run(["regression-table", "-o", tmp_path / "res"] + argv, capsys)
        assert rc == 2 and needle in err, (argv, err)
    assert not (tmp_path / "res").exists()


def test_non_empty_output_dir_needs_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc, _, err = _run(["train", "-o", out, "--epochs", "1"] + TINY, capsys)
    assert rc == 2 and "not empty" in err and "--resume" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    for stale in ("tensorboard/events.out.tfevents.old", "evaluation/reliability.png"):
        (out / stale).parent.mkdir()
        (out / stale).write_text("from an earlier run")
    rc, _, err = _run(["train", "-o", out, "--epochs", "1", "--overwrite"] + TINY, capsys)
    assert rc == 0, err
    assert (out / "checkpoint.pt").is_file() and (out / "notes.txt").read_text() == "mine"
    # the earlier run's events and plots are gone: nothing mixes with the new run
    assert not (out / "tensorboard" / "events.out.tfevents.old").exists()
    assert not (out / "evaluation").exists()
    # resuming a finished run without more epochs is refused, the run stays as it was
    before = (out / "checkpoint.pt").read_bytes()
    rc, _, err = _run(["train", "-o", out, "--resume"] + TINY[:1], capsys)
    assert rc == 2 and "already has 1 epochs" in err
    assert (out / "checkpoint.pt").read_bytes() == before
    # a resume whose config differs in more than epochs/device is refused
    rc, _, err = _run(["train", "-o", out, "--resume", "--epochs", "2", "--seed", "5"] + TINY,
                      capsys)
    assert rc == 2 and "'seed'" in err


# ------------------------------------------------------------------------------ train / resume
@pytest.mark.parametrize("method", ex.METHODS)
def test_resume_continues_bit_identically(tmp_path, capsys, method):
    common = ["--method", method] + TINY
    rc, out, err = _run(["train", "-o", tmp_path / "straight", "--epochs", "4"] + common, capsys)
    assert rc == 0, err
    rc, _, err = _run(["train", "-o", tmp_path / "split", "--epochs", "2"] + common, capsys)
    assert rc == 0, err
    rc, out, err = _run(["train", "-o", tmp_path / "split", "--resume", "--epochs", "4",
                         "--no-progress"], capsys)
    assert rc == 0, err
    assert "resuming after epoch 2" in out
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 4
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        if torch.is_tensor(v):
            assert torch.equal(v, b["model"][k]), k
    drop = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert drop(a["history"]) == drop(b["history"])
    assert len(a["history"]) == 4
    fa = json.loads((tmp_path / "straight" / "final_metrics.json").read_text())
    fb = json.loads((tmp_path / "split" / "final_metrics.json").read_text())
    assert fa == fb and math.isfinite(fa["test_rmse"]) and math.isfinite(fa["test_ll"])
    with open(tmp_path / "split" / "metrics.csv") as fh:
        assert [r["epoch"] for r in csv.DictReader(fh)] == ["1", "2", "3", "4"]


def test_cosine_lr_decay_schedules_resumes_and_refuses_extension(tmp_path, capsys):
    cfg = tmp_path / "cos.json"
    cfg.write_text(json.dumps({"method": "noisy_adam", "optimizer": {"lr": 1e-3},
                               "lr_decay": {"cosine": True}, "epochs": 4}))
    exp = ex.Experiment(ex.resolve_config(json.loads(cfg.read_text())))
    lrs = []
    for _ in range(4):
        lrs.append(exp.optimizer.param_groups[0]["lr"])
        exp.scheduler.step()
    np.testing.assert_allclose(lrs, [1e-3 * (1 + math.cos(math.pi * e / 4)) / 2
                                     for e in range(4)], rtol=1e-12)
    for bad in ({"cosine": False}, {"cosine": True, "step": 3}, {"cosine": 1}):
        with pytest.raises(ex.ConfigError, match="lr_decay"):
            ex.resolve_config({"lr_decay": bad})
    # an interrupted cosine run resumes onto the same schedule, bit-identically
    small = ex.resolve_config(dict(json.loads(cfg.read_text()), train_subset=60, batch_size=10,
                                   eval_samples=0, test_samples=5))
    straight = ex.Experiment(small)
    straight.fit(4)
    half = ex.Experiment(small)
    half.fit(2)
    state = half.state_dict()   # before the next Experiment reseeds the global RNG
    resumed = ex.Experiment(small)
    resumed.load_state_dict(state)
    resumed.fit(4)
    assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]
    for (k, v), (_, w) in zip(straight.var_model.named_parameters(),
                              resumed.var_model.named_parameters()):
        assert torch.equal(v, w), k
    # extending it would restart the cosine: refused, and nothing is written
    rc, _, err = _run(["train", "-o", tmp_path / "run", "--config", cfg, "--epochs", "2"] + TINY,
                      capsys)
    assert rc == 0, err
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    rc, _, err = _run(["train", "-o", tmp_path / "run", "--resume", "--epochs", "6"], capsys)
    assert rc == 2 and "cannot be extended to epochs = 6" in err
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def test_flags_override_the_config(tmp_path, capsys):
    cfg = ex.quickstart_config("bbb")
    cfg.update(epochs=50, name="mine")
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    rc, _, err = _run(["train", "--config", path, "-o", tmp_path / "r", "--epochs", "1",
                       "--hidden", "7,5", "--lr", "0.005", "--seed", "3"] + TINY, capsys)
    assert rc == 0, err
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["epochs"] == 1 and saved["model"]["hidden"] == [7, 5]
    assert saved["optimizer"]["lr"] == 0.005 and saved["seed"] == 3 and saved["name"] == "mine"
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert state["model"]["model.0.weight"].shape == (7, 6)
    # another method drops the config's optimizer settings and name
    rc, _, err = _run(["train", "--config", path, "-o", tmp_path / "m", "--epochs", "1",
                       "--method", "map"] + TINY, capsys)
    assert rc == 0, err
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["name"] == "map_embedded" and saved["optimizer"] == {"lr": ex.DEFAULT_LR["map"]}


def test_map_evaluation_matches_training_and_plots(tmp_path, capsys):
    rc, _, err = _run(["train", "-o", tmp_path / "r", "--method", "map", "--epochs", "30",
                       "--lr", "0.01", "--test-samples", "50", "--no-progress"], capsys)
    assert rc == 0, err
    final = json.loads((tmp_path / "r" / "final_metrics.json").read_text())
    rc, out, err = _run(["evaluate", tmp_path / "r", "--samples", "50"], capsys)
    assert rc == 0, err
    res = json.loads((tmp_path / "r" / "evaluation" / "evaluation.json").read_text())
    # the MAP mean prediction does not depend on the noise draws: the RMSE is reproduced
    assert res["rmse"] == pytest.approx(final["test_rmse"], rel=1e-9)
    assert res["test_ll"] == pytest.approx(final["test_ll"], abs=0.1)
    assert res["rmse"] < 3.0  # a 30-epoch MAP fit is far better than the mean (~15)
    for name in ("predictions.png", "training_curves.png"):
        assert _is_png(tmp_path / "r" / "evaluation" / name)


def _is_png(path):
    import matplotlib.image as mpimg
    if not path.is_file() or path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    img = mpimg.imread(path)
    return img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0


def test_mnist_train_and_evaluate_with_ood(tmp_path, capsys, data_dir):
    rc, out, err = _run(["train", "-o", tmp_path / "r", "--dataset", "mnist", "--method", "map",
                         "--data-dir", data_dir, "--epochs", "2", "--train-subset", "2000",
                         "--test-subset", "500", "--hidden", "64", "--batch-size", "50",
                         "--lr", "0.003", "--eval-samples", "1", "--no-progress"], capsys)
    assert rc == 0, err
    assert "test accuracy" in out
    rc, out, err = _run(["evaluate", tmp_path / "r", "-o", tmp_path / "ev", "--samples", "3"],
                        capsys)
    assert rc == 0, err
    res = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert res["ood_dataset"] == "fashion_mnist"
    # recompute from the checkpoint with a plain network holding the MAP weights
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    net = ex.build_network(state["config"]["model"], (1, 28, 28), 10)
    net.load_state_dict({k[len("model."):]: v for k, v in state["model"].items()
                         if k.startswith("model.")})
    from pyvarinf2.data import load_image_dataset
    test = load_image_dataset("mnist", data_dir, parts=("test",))
    fashion = load_image_dataset("fashion_mnist", data_dir, parts=("test",))
    with torch.no_grad():
        p_in = torch.softmax(net(test.x_test[:500]), -1).double()
        p_out = torch.softmax(net(fashion.x_test[:500]), -1).double()
    y = test.y_test[:500]
    assert res["accuracy"] == pytest.approx(float((p_in.argmax(1) == y).double().mean()),
                                            abs=1e-12)
    assert res["nll"] == pytest.approx(float(-torch.log(p_in[torch.arange(500), y]).mean()),
                                       rel=1e-5)
    ent = lambda p: -(p * torch.log(p.clamp_min(1e-12))).sum(1).numpy()  # noqa: E731
    assert res["ood_auroc"] == pytest.approx(metrics.ood_auroc(ent(p_in), ent(p_out)),
                                             abs=1e-3)
    assert res["accuracy"] > 0.8 and res["ood_auroc"] > 0.6
    assert 0 <= res["ece"] < 0.2 and 0 < res["brier"] < 0.4
    for name in ("reliability.png", "entropy_histogram.png", "training_curves.png"):
        assert _is_png(tmp_path / "ev" / name), name


# ------------------------------------------------------------------------------ UCI table
def test_regression_table_parallel_and_resumable(tmp_path, capsys, data_dir):
    res = tmp_path / "res"
    base = ["regression-table", "--datasets", "yacht", "--methods", "map,bbb", "--epochs", "2",
            "--data-dir", data_dir, "-o", res, "--workers", "2", "--no-progress"]
    rc, out, err = _run(base + ["--splits", "2"], capsys)
    assert rc == 0, err + out
    with open(res / "uci_regression.csv") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["dataset", "method", "n_splits", "rmse_mean", "rmse_se",
                                     "ll_mean", "ll_se"]
        rows = {r["method"]: r for r in reader}
    assert set(rows) == {"map", "bbb"}
    for method, row in rows.items():
        recs = [json.loads((res / "uci_splits" / "yacht" / method / f"split_{s}.json")
                           .read_text()) for s in range(2)]
        assert [r["split"] for r in recs] == [0, 1] and row["n_splits"] == "2"
        rm = np.array([r["rmse"] for r in recs])
        ll = np.array([r["ll"] for r in recs])
        assert float(row["rmse_mean"]) == pytest.approx(rm.mean(), rel=1e-5)
        assert float(row["rmse_se"]) == pytest.approx(rm.std(ddof=1) / math.sqrt(2), rel=1e-5)
        assert float(row["ll_mean"]) == pytest.approx(ll.mean(), rel=1e-5)
        assert float(row["ll_se"]) == pytest.approx(ll.std(ddof=1) / math.sqrt(2), rel=1e-5)
        assert recs[0]["rmse"] != recs[1]["rmse"]  # different splits, different results
    # a worker's split result is what an in-process run of the same config gives
    rec = json.loads((res / "uci_splits" / "yacht" / "bbb" / "split_1.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        again = ex.run_uci_split(rec["config"], data_dir)
    finally:
        torch.set_num_threads(threads)
    assert again["rmse"] == pytest.approx(rec["rmse"], rel=1e-4)
    assert again["ll"] == pytest.approx(rec["ll"], rel=1e-4)
    # re-running skips the finished splits; one more split runs only the new ones
    stamp = {p: p.stat().st_mtime_ns for p in (res / "uci_splits").rglob("*.json")}
    base[base.index("--workers") + 1] = "1"  # (in-process this time: no worker start-up)
    rc, out, err = _run(base + ["--splits", "3"], capsys)
    assert rc == 0, err
    assert "4 of 6 split results already present; running 2" in out
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items())
    with open(res / "uci_regression.csv") as fh:
        assert {r["n_splits"] for r in csv.DictReader(fh)} == {"3"}


def test_uci_protocol_configs():
    for d in UCI_DATASETS:
        cfg = ex.resolve_config(ex.uci_config(d, "noisy_kfac"))
        protein = d == "protein-tertiary-structure"
        assert cfg["model"]["hidden"] == [100 if protein else 50]
        assert cfg["batch_size"] == (100 if protein else 10)
        assert (cfg["epochs"], cfg["train_samples"], cfg["test_samples"]) == (1000, 10, 100)
        assert cfg["noise_prior"] == [6.0, 6.0] and cfg["prior"]["std"] == 1.0
        assert cfg["kl_weight"] == 1.0


def test_config_files_are_complete_valid_and_up_to_date():
    spec = importlib.util.spec_from_file_location("generate_configs",
                                                  ROOT / "configs" / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.main(["--check"]) == 0, "configs/ is stale: run python configs/generate.py"
    files = sorted((ROOT / "configs").rglob("*.json"))
    seen = set()
    for path in files:
        cfg = ex.resolve_config(ex.load_config(path), where=str(path))
        seen.add((cfg["method"], cfg["dataset"]))
    for m in ex.METHODS:
        for d in list(UCI_DATASETS) + list(IMAGE_DATASETS) + ["embedded"]:
            assert (m, d) in seen, (m, d)


# ------------------------------------------------------------------------------ noise model
def test_observation_noise_kl_and_expected_nll():
    noise = ex.ObservationNoise(6.0, 6.0)
    with torch.no_grad():
        noise.log_alpha.fill_(math.log(20.0))
        noise.log_beta.fill_(math.log(3.0))
    q = torch.distributions.Gamma(torch.tensor(20.0), torch.tensor(3.0))
    p = torch.distributions.Gamma(torch.tensor(6.0), torch.tensor(6.0))
    assert noise.kl().item() == pytest.approx(torch.distributions.kl_divergence(q, p).item(),
                                              rel=1e-5)
    # E_q[-log N(y; f, 1/tau)] against a Monte-Carlo average over tau
    torch.manual_seed(0)
    f, y = torch.tensor([0.3, -1.0]), torch.tensor([0.5, 0.2])
    tau = q.sample((400000,)).double().unsqueeze(1)
    mc = (-0.5 * torch.log(tau) + 0.5 * math.log(2 * math.pi)
          + 0.5 * tau * ((y - f) ** 2).double().unsqueeze(0)).mean()
    assert noise.expected_nll(f, y).item() == pytest.approx(mc.item(), rel=2e-3)
    # at the prior the KL is zero
    assert ex.ObservationNoise(6.0, 6.0).kl().item() == pytest.approx(0.0, abs=1e-6)


def test_metrics_are_written_as_tensorboard_events(tmp_path, capsys):
    """The real writer (tensorboard is in the test extras): the event file read back with
    TensorBoard's own reader holds every per-epoch metric of metrics.csv."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    rc, _, err = _run(["train", "-o", tmp_path / "r", "--epochs", "2"] + TINY, capsys)
    assert rc == 0, err
    with open(tmp_path / "r" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    acc = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for key in ("train_nll", "train_loss", "test_rmse", "test_ll"):
        assert key in tags, sorted(tags)
        events = {e.step: e.value for e in acc.Scalars(key)}
        assert sorted(events) == [int(row["epoch"]) for row in rows]
        for row in rows:
            assert events[int(row["epoch"])] == pytest.approx(float(row[key]), rel=1e-6)


def test_metrics_go_to_tensorboard_when_available(tmp_path, capsys, monkeypatch):
    calls = []

    class Recorder:
        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            calls.append("closed")

    monkeypatch.setattr(ex, "_tensorboard_writer", lambda out_dir, **kw: Recorder())
    rc, _, err = _run(["train", "-o", tmp_path / "r", "--epochs", "2"] + TINY, capsys)
    assert rc == 0, err
    with open(tmp_path / "r" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    logged = {(t, s): v for t, v, s in calls[:-1]}
    assert calls[-1] == "closed"
    for row in rows:
        for key in ("train_nll", "train_loss", "test_rmse", "test_ll"):
            assert logged[(key, int(row["epoch"]))] == pytest.approx(float(row[key]), rel=1e-8)


@pytest.mark.parametrize("method", ["bbb", "noisy_adam", "noisy_kfac"])
def test_observation_noise_gradient_is_the_mean_over_weight_samples(method):
    # with train_samples = S the learned noise precision takes the average of the S samples'
    # gradients (plus that of KL/N), for Bayes-by-backprop and the natural-gradient methods
    cfg = ex.resolve_config(dict(ex.quickstart_config(), method=method, train_samples=4,
                                 train_subset=40, batch_size=10, eval_samples=0,
                                 test_samples=5, optimizer={"lr": 1e-3}))
    exp = ex.Experiment(cfg)
    noise_params = list(exp.noise.parameters())
    with torch.no_grad():   # away from the prior, where the KL's gradient vanishes
        exp.noise.log_alpha.fill_(math.log(20.0))
        exp.noise.log_beta.fill_(math.log(3.0))
    kl_grad = torch.autograd.grad(exp.noise.kl() / exp.n_train, noise_params)
    per_sample = []
    nll_of = exp._nll

    def recording_nll(out, y):
        nll = nll_of(out, y)
        per_sample.append(torch.autograd.grad(nll, noise_params, retain_graph=True))
        return nll

    exp._nll = recording_nll
    seen = []
    opt = exp.noise_optimizer if exp.noise_optimizer is not None else exp.optimizer
    step_of = opt.step

    def recording_step(*args, **kwargs):
        seen.append([p.grad.clone() for p in noise_params])
        return step_of(*args, **kwargs)

    opt.step = recording_step
    xb, yb = exp.x_train[:10], exp.y_train[:10]
    exp.train_step(xb, yb)
    assert len(per_sample) == 4 and len(seen) == 1
    for i, p in enumerate(noise_params):
        expected = sum(g[i] for g in per_sample) / 4 + kl_grad[i]
        torch.testing.assert_close(seen[0][i], expected, rtol=1e-5, atol=1e-7)
    # the samples differ, so the last one alone would not pass
    assert not torch.allclose(per_sample[-1][0], sum(g[0] for g in per_sample) / 4, rtol=1e-3)


def test_observation_noise_reaches_the_conjugate_optimum():
    # For fixed residuals r the per-example objective E_q[-log N(r; 0, 1/tau)] + KL(q || p) / N
    # over q = Gamma(alpha, beta) is minimised by the conjugate update alpha0 + N/2,
    # beta0 + sum(r^2)/2. (This is what bounds the UCI log-likelihood from above: with a
    # Gamma(6, 6) prior E_q[tau] <= (6 + N/2) / 6, see benchmarks/uci_table.py.)
    torch.manual_seed(0)
    n = 50
    r = 0.3 * torch.randn(n, dtype=torch.float64)
    noise = ex.ObservationNoise(6.0, 6.0).double()
    opt = torch.optim.LBFGS(noise.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12,
                            tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = noise.expected_nll(torch.zeros(n, dtype=torch.float64), r) + noise.kl() / n
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    assert noise.alpha.item() == pytest.approx(6.0 + n / 2, rel=1e-6)
    assert noise.beta.item() == pytest.approx(6.0 + float((r ** 2).sum()) / 2, rel=1e-6)


def test_local_reparameterization_from_the_command_line(tmp_path, capsys):
    rc, _, err = _run(["train", "-o", tmp_path / "r", "--epochs", "1",
                       "--local-reparameterization"] + TINY, capsys)
    assert rc == 0, err
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["method"] == "bbb" and saved["local_reparameterization"] is True
    exp = ex.Experiment(ex.resolve_config(dict(saved, epochs=1)))
    assert exp.var_model.local_reparameterization is True
    assert [p for p, *_ in exp.var_model.local_reparameterization_layers()] == ["0", "2"]
    # other methods and non-booleans are bad input, before anything is written
    rc, _, err = _run(["train", "-o", tmp_path / "n", "--method", "noisy_adam",
                       "--local-reparameterization"] + TINY, capsys)
    assert rc == 2 and "local_reparameterization" in err and not (tmp_path / "n").exists()
    with pytest.raises(ex.ConfigError, match="local_reparameterization"):
        ex.resolve_config({"local_reparameterization": "yes"})
    # the key left at false keeps the fingerprints of results saved before it existed
    cfg = ex.resolve_config(ex.uci_config("yacht", "bbb"))
    old = {k: v for k, v in cfg.items() if k != "local_reparameterization"}
    assert ex._fingerprint(cfg) == ex._fingerprint(old)
    assert ex._fingerprint(dict(cfg, local_reparameterization=True)) != ex._fingerprint(old)


def _readme_commands():
    text = (ROOT / "README.rst").read_text(encoding="utf-8")
    return [line.split("#")[0].split()[1:] for line in text.splitlines()
            if line.strip().startswith("pyvarinf2 ")]


@pytest.mark.parametrize("argv", _readme_commands(), ids=" ".join)
def test_readme_commands_are_valid(argv, data_dir, monkeypatch):
    # every `pyvarinf2 ...` line of the README parses, and names datasets, methods and config
    # files that exist (checked as the command would, without training)
    assert argv, "no command"
    monkeypatch.chdir(ROOT)
    args = cli.build_parser().parse_args(argv)
    if args.command == "train":
        cfg, where = cli._train_config(args)
        ex.resolve_config(cfg, where=where)
    elif args.command == "regression-table":
        ex.plan_regression_table(args.datasets, args.methods, epochs=args.epochs,
                                 n_splits=args.splits, data_dir=data_dir, out_dir="unused")


def test_readme_shows_every_command():
    assert {a[0] for a in _readme_commands()} == {"train", "evaluate", "regression-table"}


def test_uci_table_compares_with_mc_dropout_not_standard_dropout(data_dir):
    # the data's results folders hold standard-dropout RMSEs (test_rmse_*) beside the MC-dropout
    # ones (test_MC_rmse_*); the table's "MC dropout" columns must be the MC pair, as Gal's
    # own log and README give them (boston 2.90 ± 0.18 / -2.40 ± 0.04, yacht 0.67 ± 0.05)
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "uci_table.py"
    spec = importlib.util.spec_from_file_location("uci_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rmse, rmse_se, ll, ll_se, n = mod.mc_dropout(data_dir, "bostonHousing")
    assert n == 20
    # Gal's log: means 2.903623 and -2.401936, standard errors with ddof=0 (0.176840, 0.041702);
    # ours use ddof=1 like our own rows, a factor sqrt(20/19)
    c = math.sqrt(20 / 19)
    assert rmse == pytest.approx(2.903623, abs=1e-5)
    assert rmse_se == pytest.approx(0.176840 * c, abs=1e-5)
    assert ll == pytest.approx(-2.401936, abs=1e-5)
    assert ll_se == pytest.approx(0.041702 * c, abs=1e-5)
    assert mod.mc_dropout(data_dir, "yacht")[0] == pytest.approx(0.67, abs=0.005)
    # a partial row is compared over its own splits (boston's first three are easy ones)
    first = mod.mc_dropout(data_dir, "bostonHousing", [2, 0, 1])
    assert first[4] == 3 and first[0] == pytest.approx(2.58, abs=0.005)


@pytest.mark.parametrize("method", ["bbb", "noisy_kfac"])
def test_logged_prior_term_is_the_trained_one_under_a_kl_weight(method):
    # training tempers the weights' KL by kl_weight but not the observation noise's KL; the
    # logged prior term (and so train_loss in metrics.csv) must be that same objective
    cfg = ex.resolve_config(dict(ex.quickstart_config(), method=method, kl_weight=0.25,
                                 train_subset=40, batch_size=10, eval_samples=0,
                                 test_samples=5))
    exp = ex.Experiment(cfg)
    with torch.no_grad():
        exp.noise.log_alpha.fill_(math.log(20.0))
        weights, noise = float(exp.var_model.prior_loss()), float(exp.noise.kl())
    assert noise > 1.0
    assert exp.prior_term() == pytest.approx((0.25 * weights + noise) / exp.n_train, rel=1e-6)


def test_per_epoch_test_metrics_do_not_change_the_training_run(tmp_path, capsys):
    # the monitoring draws weight samples; it runs on a forked random stream, so the same
    # seed trains the same model whether or not (and how much) it is watched
    runs = {}
    for n in (0, 7):
        out = tmp_path / f"eval{n}"
        rc, _, err = _run(["train", "-o", out, "--epochs", "3"] + TINY + ["--eval-samples", n],
                          capsys)
        assert rc == 0, err
        runs[n] = torch.load(out / "checkpoint.pt", weights_only=True)
    assert [r["train_loss"] for r in runs[0]["history"]] == \
        [r["train_loss"] for r in runs[7]["history"]]
    for k, v in runs[0]["model"].items():
        if torch.is_tensor(v):
            assert torch.equal(v, runs[7]["model"][k]), k
    assert "test_rmse" in runs[7]["history"][-1] and "test_rmse" not in runs[0]["history"][-1]


def test_opt_values_are_json_except_the_word_valued_options():
    assert cli._key_value("betas=[0.9, 0.99]") == ("betas", [0.9, 0.99])
    assert cli._key_value("kl_clip=null") == ("kl_clip", None)
    assert cli._key_value("mc_samples=3") == ("mc_samples", 3)
    # fisher=true is the word: the option takes 'empirical' or 'true', not a boolean
    assert cli._key_value("fisher=true") == ("fisher", "true")
    assert cli._key_value('fisher="true"') == ("fisher", "true")
    assert cli._key_value("likelihood=gaussian") == ("likelihood", "gaussian")


def test_resume_finds_the_data_where_the_run_was_trained(tmp_path, capsys, data_dir,
                                                         monkeypatch):
    # like evaluate, a resume without --data-dir (and no PYVARINF2_DATA) reads the data from
    # the directory the run was trained on
    monkeypatch.delenv("PYVARINF2_DATA", raising=False)
    mine = tmp_path / "mydata"
    shutil.copytree(pathlib.Path(data_dir) / "uci" / "yacht", mine / "uci" / "yacht")
    out = tmp_path / "yacht"
    rc, _, err = _run(["train", "-o", out, "--dataset", "yacht", "--epochs", "1",
                       "--data-dir", mine] + TINY, capsys)
    assert rc == 0, err
    rc, _, err = _run(["train", "-o", out, "--resume", "--epochs", "2", "--no-progress"], capsys)
    assert rc == 0, err
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["data_dir"] == str(mine)


# ------------------------------------------------------------------------------ review fixes
def _checkpoint_config(tmp_path, every=1):
    path = tmp_path / "every.json"
    path.write_text(json.dumps({"checkpoint_every": every}))
    return ["--config", path]


def _explode_at(monkeypatch, epoch, exc=None):
    """Make the step after the last loss of epoch ``epoch`` blow the weights up (``exc``:
    raise it at the start of that epoch instead)."""
    original = ex.Experiment.train_epoch

    def train_epoch(self, progress=None):
        if exc is not None and self.epoch + 1 == epoch:
            raise exc
        nll = original(self, progress)
        if exc is None and self.epoch == epoch:
            with torch.no_grad():
                next(self.var_model.parameters()).fill_(float("inf"))
        return nll

    monkeypatch.setattr(ex.Experiment, "train_epoch", train_epoch)


def test_a_blow_up_at_the_end_of_an_epoch_saves_nothing_of_it(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    argv = ["train", "-o", out, "--epochs", "3"] + TINY + _checkpoint_config(tmp_path)
    with monkeypatch.context() as m:
        _explode_at(m, 2)
        rc, _, err = _run(argv, capsys)
    assert rc == 1 and "epoch 2" in err and "became non-finite" in err, err
    state, _ = ex.load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 1                      # epoch 1's checkpoint, not the broken one
    with open(out / "metrics.csv") as fh:
        assert [r["epoch"] for r in csv.DictReader(fh)] == ["1"]
    assert not (out / "final_metrics.json").exists()
    rc, _, err = _run(argv + ["--resume"], capsys)  # and the run goes on from it
    assert rc == 0, err
    # a real blow-up (lr 1e30, one batch per epoch): stopped, nothing saved, no traceback
    rc, _, err = _run(["train", "-o", tmp_path / "b", "--epochs", "2", "--method", "map",
                       "--lr", "1e30", "--no-progress", "--train-subset", "60",
                       "--batch-size", "1000", "--eval-samples", "2", "--test-samples", "5"],
                      capsys)
    assert rc == 1 and "training diverged" in err and "lower the learning rate" in err, err
    assert not (tmp_path / "b" / "checkpoint.pt").exists()


def test_interrupt_message_and_a_run_interrupted_in_its_final_evaluation(tmp_path, capsys,
                                                                         monkeypatch):
    out = tmp_path / "r"
    argv = ["train", "-o", out, "--epochs", "2"] + TINY
    with monkeypatch.context() as m:
        _explode_at(m, 1, KeyboardInterrupt())
        rc, _, err = _run(argv + _checkpoint_config(tmp_path), capsys)
    assert rc == 130 and "no checkpoint was written yet" in err and "--overwrite" in err
    with monkeypatch.context() as m:
        _explode_at(m, 2, KeyboardInterrupt())
        rc, _, err = _run(argv + _checkpoint_config(tmp_path) + ["--overwrite"], capsys)
    assert rc == 130 and f"--resume --output-dir {out}" in err
    # killed during the final evaluation: the checkpoint is at the last epoch, no final
    # metrics; --resume runs just that evaluation, with the same numbers as a straight run
    rc, _, err = _run(argv + ["-o", tmp_path / "straight"], capsys)
    assert rc == 0, err
    straight = json.loads((tmp_path / "straight" / "final_metrics.json").read_text())
    (tmp_path / "straight" / "final_metrics.json").unlink()
    rc, _, err = _run(argv + ["-o", tmp_path / "straight", "--resume"], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "straight" / "final_metrics.json").read_text()) == straight
    rc, _, err = _run(argv + ["-o", tmp_path / "straight", "--resume"], capsys)
    assert rc == 2 and "already has 2 epochs" in err


def test_resume_rewrites_tensorboard_events_after_the_checkpoint(tmp_path, capsys,
                                                                 monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "r"
    argv = ["train", "-o", out, "--epochs", "4"] + TINY + _checkpoint_config(tmp_path, 2)
    with monkeypatch.context() as m:        # epochs 1-3 logged, checkpoint after epoch 2
        _explode_at(m, 4, KeyboardInterrupt())
        assert _run(argv, capsys)[0] == 130
    rc, _, err = _run(argv + ["--resume"], capsys)
    assert rc == 0, err
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    steps = [e.step for e in acc.Scalars("train_nll")]
    assert sorted(steps) == [1, 2, 3, 4], steps       # epoch 3 once, not twice
    for e in acc.Scalars("train_nll"):
        assert e.value == pytest.approx(float(rows[e.step - 1]["train_nll"]), rel=1e-6)


def test_checkpoint_records_an_absolute_data_dir(tmp_path, capsys, monkeypatch):
    data = ex.data_mod.resolve_data_dir(None)
    monkeypatch.chdir(tmp_path)
    rel = os.path.relpath(data, tmp_path)
    rc, _, err = _run(["train", "-o", "r", "--epochs", "1", "--dataset", "yacht",
                       "--data-dir", rel] + TINY, capsys)
    assert rc == 0, err
    state, _ = ex.load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert pathlib.Path(state["data_dir"]).is_absolute()
    assert pathlib.Path(state["data_dir"]) == pathlib.Path(data).resolve()
    monkeypatch.chdir(tmp_path.parent)               # evaluate from elsewhere
    rc, _, err = _run(["evaluate", tmp_path / "r", "-o", tmp_path / "ev"], capsys)
    assert rc == 0, err
    rc, _, err = _run(["evaluate", tmp_path / "r", "-o", tmp_path / "ev2", "--ood-dataset",
                       "mnist"], capsys)
    assert rc == 2 and "regression run" in err and not (tmp_path / "ev2").exists()
    rc, _, err = _run(["train", "--resume"] + TINY, capsys)
    assert rc == 2 and "--resume needs --output-dir" in err
