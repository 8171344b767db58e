"""The ``pyvarinf2`` command: ``train``, ``evaluate``, ``regression-table``.

Bad input (a missing or malformed config, an unknown dataset or method, a data directory
without the files, an unusable device or output directory) prints ``pyvarinf2: error: ...``
and exits with status 2 before anything is written.
"""
import argparse
import json
import math
import pathlib
import sys

__all__ = ["main", "build_parser"]


def _comma_list(text):
    return [t.strip() for t in text.split(",") if t.strip()]


def _unique_comma_list(text):
    """A comma-separated list without repeats (a name given twice would run, and count, its
    splits twice)."""
    items = _comma_list(text)
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    repeated = sorted({t for t in items if items.count(t) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{repeated} given more than once")
    return items


def _int_list(text):
    try:
        return [int(t) for t in _comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


#: optimizer options whose values are words: their VALUE is taken as text, never as JSON
#: (``--opt fisher=true`` is the word 'true', not the boolean)
_TEXT_OPTIONS = {"fisher", "likelihood", "damping_mode"}


def _key_value(text):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    key = key.strip()
    if key in _TEXT_OPTIONS:
        return key, value.strip().strip("'\"")
    try:
        value = json.loads(value)
    except json.JSONDecodeError:
        pass  # a bare string
    return key, value


def build_parser():
    from .experiments import METHODS
    from .data import UCI_DATASETS, known_datasets
    parser = argparse.ArgumentParser(
        prog="pyvarinf2",
        description="Variational Bayesian deep learning: train, evaluate, UCI regression table.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    # ------------------------------------------------------------------ train
    t = sub.add_parser(
        "train", help="train a model from a JSON config (default: the shipped quickstart)",
        description="Train a model. Without --config the shipped quickstart config is used: "
                    "Bayes-by-backprop on the UCI yacht data shipped in the package, a few "
                    "seconds, no network. Flags override the config's fields.")
    t.add_argument("--config", help="JSON config file (see configs/ in the repository)")
    t.add_argument("--dataset", help=f"one of {', '.join(known_datasets())}")
    t.add_argument("--method", help=f"one of {', '.join(METHODS)}")
    t.add_argument("--model", choices=["mlp", "lenet"], help="network architecture")
    t.add_argument("--hidden", type=_int_list, help="hidden layer sizes, e.g. 50 or 400,400")
    t.add_argument("--activation", help="relu, tanh, sigmoid or gelu")
    t.add_argument("--lr", type=float, help="learning rate")
    t.add_argument("--opt", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="an optimizer hyper-parameter (repeatable; VALUE is JSON, except for "
                        "the word-valued fisher, likelihood and damping_mode), e.g. "
                        "--opt extrinsic_damping=1e-3 --opt betas=[0.9,0.99] --opt fisher=true")
    t.add_argument("--prior-std", type=float, help="std of the Gaussian prior")
    t.add_argument("--kl-weight", type=float, help="KL weight λ (1 = ELBO)")
    t.add_argument("--init-std", type=float, help="initial posterior std (map/bbb)")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--epochs", type=int)
    t.add_argument("--train-samples", type=int, help="weight samples per training step")
    t.add_argument("--local-reparameterization", action="store_true", default=None,
                   help="bbb only: per-example pre-activation noise in the Linear layers "
                        "(local reparameterisation trick)")
    t.add_argument("--test-samples", type=int, help="weight samples for the final evaluation")
    t.add_argument("--eval-samples", type=int, help="weight samples for per-epoch test metrics "
                                                    "(0: none)")
    t.add_argument("--split", type=int, help="UCI train/test split")
    t.add_argument("--train-subset", type=int, help="use the first N training examples")
    t.add_argument("--test-subset", type=int, help="use the first N test examples")
    t.add_argument("--seed", type=int)
    t.add_argument("--device", help="cpu or cuda[:n]")
    t.add_argument("--threads", type=int,
                   help="torch CPU threads (default: 1 for the small UCI networks, where more "
                        "threads only add overhead; torch's default otherwise)")
    t.add_argument("--name", help="run name")
    t.add_argument("--data-dir", help="data directory (default: $PYVARINF2_DATA, else the data "
                                      "shipped in the package)")
    t.add_argument("--output-dir", "-o", help="run directory (default runs/<name>-<time>)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --output-dir from its checkpoint")
    t.add_argument("--overwrite", action="store_true",
                   help="start afresh in a non-empty --output-dir")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")

    # ------------------------------------------------------------------ evaluate
    e = sub.add_parser(
        "evaluate", help="evaluate a checkpoint: metrics and PNG plots",
        description="Evaluate a trained run: accuracy, NLL, ECE, Brier, OOD AUROC "
                    "(classification) or RMSE and test log-likelihood (regression), with a "
                    "reliability diagram, entropy histograms and training curves as PNG.")
    e.add_argument("checkpoint", help="checkpoint.pt or the run directory holding it")
    e.add_argument("--output-dir", "-o", help="where to write (default <run dir>/evaluation)")
    e.add_argument("--samples", type=int, help="weight samples (default: the config's "
                                               "test_samples)")
    e.add_argument("--ood-dataset", default="auto",
                   help="out-of-distribution set: auto (MNIST <-> Fashion-MNIST), none, mnist, "
                        "fashion_mnist")
    e.add_argument("--data-dir")
    e.add_argument("--device")
    e.add_argument("--seed", type=int, default=0)

    # ------------------------------------------------------------------ regression-table
    r = sub.add_parser(
        "regression-table", help="UCI regression benchmark over all splits",
        description="Run the UCI protocol (one hidden layer of 50 units, 100 for protein; "
                    "learned noise with a Gamma(6, 6) prior; 20 splits, 5 for protein) for the "
                    "chosen methods in parallel worker processes, one result file per split "
                    "(re-running skips finished splits), and write <output-dir>/"
                    "uci_regression.csv.")
    r.add_argument("--datasets", type=_unique_comma_list, default=list(UCI_DATASETS),
                   help="comma-separated UCI folder names (default all)")
    r.add_argument("--methods", type=_unique_comma_list, default=list(METHODS),
                   help="comma-separated methods (default all)")
    r.add_argument("--epochs", type=int, help="override the configs' epochs (e.g. for a quick "
                                              "reduced table)")
    r.add_argument("--splits", type=int, help="use only the first N splits of each dataset")
    r.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: the number of CPU cores)")
    r.add_argument("--config-dir", help="directory with regression/<method>_<dataset>.json "
                                        "(default: the built-in protocol configs)")
    r.add_argument("--data-dir")
    r.add_argument("--output-dir", "-o", default="results")
    r.add_argument("--seed", type=int, default=0, help="seed of split 0 (split i uses seed+i)")
    r.add_argument("--no-progress", action="store_true")
    return parser


# ============================================================================ commands
def _train_config(args):
    from . import experiments as ex
    if args.config is not None:
        where = args.config
        cfg = ex.load_config(args.config)
    elif args.resume and args.output_dir \
            and (pathlib.Path(args.output_dir) / "config.json").is_file():
        where = str(pathlib.Path(args.output_dir) / "config.json")
        cfg = ex.load_config(where)
    else:
        where = f"shipped quickstart config {ex.QUICKSTART_CONFIG}"
        cfg = ex.load_config(ex.QUICKSTART_CONFIG)
    cfg = dict(cfg)
    if args.method is not None and args.method != cfg.get("method"):
        cfg.pop("optimizer", None)  # the config's optimizer settings belong to its own method
    if args.name is None and ((args.method is not None and args.method != cfg.get("method"))
                              or (args.dataset is not None and args.dataset != cfg.get("dataset"))):
        cfg.pop("name", None)  # named after method and dataset again
    simple = {"dataset": args.dataset, "method": args.method, "kl_weight": args.kl_weight,
              "init_std": args.init_std, "batch_size": args.batch_size, "epochs": args.epochs,
              "train_samples": args.train_samples, "test_samples": args.test_samples,
              "local_reparameterization": args.local_reparameterization,
              "eval_samples": args.eval_samples, "split": args.split,
              "train_subset": args.train_subset, "test_subset": args.test_subset,
              "seed": args.seed, "device": args.device, "name": args.name}
    for key, value in simple.items():
        if value is not None:
            cfg[key] = value
    for key in ("model", "optimizer"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise ex.ConfigError(f"{where}: '{key}' must be an object ({{...}}), got "
                                 f"{cfg[key]!r}")
    model = dict(cfg.get("model") or {})
    for key, value in (("kind", args.model), ("hidden", args.hidden),
                       ("activation", args.activation)):
        if value is not None:
            model[key] = value
    if model:
        cfg["model"] = model
    opt = dict(cfg.get("optimizer") or {})
    for key, value in args.opt:
        opt[key] = value
    if args.lr is not None:
        opt["lr"] = args.lr
    cfg["optimizer"] = opt
    if args.prior_std is not None:
        cfg["prior"] = {"kind": "gaussian", "std": args.prior_std}
    overridden = (any(v is not None for v in simple.values()) or args.opt or args.lr is not None
                  or args.prior_std is not None
                  or any(v is not None for v in (args.model, args.hidden, args.activation)))
    if overridden:
        where += " with command-line overrides"
    return cfg, where


def cmd_train(args, out=print):
    import torch

    from . import experiments as ex
    cfg, where = _train_config(args)
    resolved = ex.resolve_config(cfg, where=where)
    if args.resume and not args.output_dir:
        raise ex.ConfigError("--resume needs --output-dir: the directory of the run to continue")
    output_dir = (pathlib.Path(args.output_dir) if args.output_dir
                  else ex.default_output_dir(resolved))
    args.run_dir = output_dir           # for the message if the run is interrupted
    if args.threads is not None and args.threads < 1:
        raise ex.ConfigError(f"--threads must be >= 1, got {args.threads}")
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif resolved["device"] == "cpu" \
            and ex.data_mod.dataset_kind(resolved["dataset"]) == "regression":
        torch.set_num_threads(1)
    try:
        return _train(args, cfg, where, output_dir, out)
    finally:
        torch.set_num_threads(threads)


def _train(args, cfg, where, output_dir, out):
    from . import experiments as ex
    exp, output_dir, state = ex.prepare_run(cfg, output_dir, data_dir=args.data_dir,
                                            resume=args.resume, overwrite=args.overwrite,
                                            where=where)
    c = exp.config
    out(f"pyvarinf2: {c['method']} on {c['dataset']}"
        + (f" split {c['split']}" if exp.kind == "regression" else "")
        + f" ({exp.n_train} training examples), {c['epochs']} epochs"
        + (f", resuming after epoch {exp.epoch}" if state is not None else "")
        + f"; data from {exp.data_dir}; writing {output_dir}")
    result = ex.train_run(exp, output_dir, progress=not args.no_progress,
                          overwrite=args.overwrite)
    n = result["test_samples"]
    if exp.kind == "regression":
        out(f"test RMSE {result['test_rmse']:.4f}   test log-likelihood "
            f"{result['test_ll']:.4f}   ({n} posterior samples, original units)")
    else:
        out(f"test accuracy {result['test_accuracy']:.4f}   NLL {result['test_nll']:.4f}   "
            f"ECE {result['test_ece']:.4f}   Brier {result['test_brier']:.4f}   ({n} samples)")
    out(f"run saved in {output_dir} (checkpoint.pt, metrics.csv, final_metrics.json); "
        f"plots: pyvarinf2 evaluate {output_dir}")
    return 0


def cmd_evaluate(args, out=print):
    from . import experiments as ex
    if args.samples is not None and args.samples < 1:
        raise ex.ConfigError(f"--samples must be >= 1, got {args.samples}")
    if not 0 <= args.seed <= ex.MAX_SEED:
        raise ex.ConfigError(f"--seed must be in [0, 2**32 - 1], got {args.seed}")
    exp, state, path, ood = ex.prepare_evaluation(args.checkpoint, data_dir=args.data_dir,
                                                  ood_dataset=args.ood_dataset,
                                                  device=args.device)
    out_dir = pathlib.Path(args.output_dir) if args.output_dir else path.parent / "evaluation"
    ex.check_output_dir(out_dir)
    res = ex.evaluate_run(exp, out_dir, n_samples=args.samples, ood=ood, seed=args.seed)
    shown = {k: v for k, v in res.items() if k != "plots"}
    width = max(len(k) for k in shown)
    for k, v in shown.items():
        out(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    out(f"wrote {out_dir / 'evaluation.json'} and {', '.join(res['plots'])} in {out_dir}")
    return 0


def cmd_regression_table(args, out=print):
    from . import experiments as ex
    if args.workers is not None and args.workers < 1:
        raise ex.ConfigError(f"--workers must be >= 1, got {args.workers}")
    if args.config_dir is not None and not pathlib.Path(args.config_dir).is_dir():
        raise ex.ConfigError(f"--config-dir {args.config_dir} is not a directory")
    ex.check_output_dir(args.output_dir)
    jobs = ex.plan_regression_table(args.datasets, args.methods, epochs=args.epochs,
                                    n_splits=args.splits, data_dir=args.data_dir,
                                    out_dir=args.output_dir, config_dir=args.config_dir,
                                    seed=args.seed)
    rows, failures = ex.regression_table(jobs, out_dir=args.output_dir, workers=args.workers,
                                         progress=not args.no_progress, log=out)
    out(f"{'dataset':<28}{'method':<13}{'splits':>6}  {'RMSE':>18}  {'test LL':>18}")
    for r in rows:
        def fmt(m, s):
            if not math.isfinite(m):
                return "-"
            return f"{m:.4g} ± {s:.2g}" if math.isfinite(s) else f"{m:.4g}"
        out(f"{r['dataset']:<28}{r['method']:<13}{r['n_splits']:>6}  "
            f"{fmt(r['rmse_mean'], r['rmse_se']):>18}  {fmt(r['ll_mean'], r['ll_se']):>18}")
    out(f"wrote {pathlib.Path(args.output_dir) / 'uci_regression.csv'}")
    if failures:
        out(f"{len(failures)} split(s) failed; re-run the same command to retry them")
        return 1
    return 0


def main(argv=None):
    from .data import DataError
    from .experiments import ConfigError
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = {"train": cmd_train, "evaluate": cmd_evaluate,
               "regression-table": cmd_regression_table}[args.command]
    try:
        return handler(args)
    except (ConfigError, DataError) as exc:
        print(f"pyvarinf2 {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        run_dir = getattr(args, "run_dir", None)
        if args.command == "regression-table":
            hint = "; re-run the same command to continue (finished splits are kept)"
        elif run_dir is not None and (pathlib.Path(run_dir) / "checkpoint.pt").is_file():
            hint = f"; continue the run with --resume --output-dir {run_dir}"
        elif run_dir is not None:
            hint = (f"; no checkpoint was written yet in {run_dir}: start again there with "
                    "--overwrite")
        else:
            hint = ""
        print(f"pyvarinf2: interrupted{hint}", file=sys.stderr)
        return 130
    except FloatingPointError as exc:  # includes pyvarinf2.optim.NonFiniteError
        print(f"pyvarinf2 {args.command}: training diverged: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
