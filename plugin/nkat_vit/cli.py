"""`nkat vit train | eval | optimize`: argument parsing (torch-free; nkat_gguf.commands.vit
registers these parsers and imports the torch parts only when a subcommand runs)."""

from __future__ import annotations

from nkat_gguf.errors import UserError

from .config import STEMS, TrainConfig, ViTConfig

DATASET_CHOICES = ("digits", "fashion-mnist", "mnist", "emnist", "cifar10")
# The CIFAR-10 recipe (the earlier NKAT-ViT's stage-2 notes).
RECIPES = {
    "cifar": {
        "model": {"stem": "tiny", "patch": 2, "dim": 384, "depth": 7, "heads": 8, "color_norm": True,
                  "attn_dropout": 0.17, "emb_dropout": 0.08, "nkat_strength": 0.0024, "nkat_decay": 0.99},
        "train": {"lr": 2e-4, "warmup_epochs": 5, "ema": 0.9995, "clip": 1.0, "randaugment_n": 2,
                  "randaugment_m": 9, "cutmix": 0.2, "mixup": 0.1, "cutout": 8},
    },
}
MODEL_FLAGS = {  # flag -> (ViTConfig field, type, help)
    "--patch": ("patch", int, "patch size on the stem's output"),
    "--stem": ("stem", str, f"conv stem: {', '.join(STEMS)} (tiny: conv 32 s2 + conv 64 s2, BN, GELU; small: tiny + a 3x3 conv)"),
    "--dim": ("dim", int, "embedding width"),
    "--depth": ("depth", int, "transformer blocks"),
    "--heads": ("heads", int, "attention heads"),
    "--mlp-ratio": ("mlp_ratio", float, "MLP width / dim"),
    "--attn-dropout": ("attn_dropout", float, "dropout on attention weights"),
    "--emb-dropout": ("emb_dropout", float, "dropout on the patch embeddings"),
    "--temperature": ("temperature", float, "attention temperature: softmax(qk / (sqrt(d) T))"),
    "--top-k": ("top_k", int, "keep the k largest attention weights per query (0 = all)"),
    "--top-p": ("top_p", float, "keep the keys holding the top-p share of attention per query (1 = all)"),
    "--nkat-strength": ("nkat_strength", float, "star-product strength s (0 = plain linear layers)"),
    "--nkat-decay": ("nkat_decay", float, "per-block decay: s_l = s * decay^l"),
    "--nkat-rank": ("nkat_rank", int, "rank of each layer's theta factors"),
}
TRAIN_FLAGS = {
    "--epochs": ("epochs", int, "training epochs"),
    "--batch-size": ("batch_size", int, "batch size"),
    "--lr": ("lr", float, "peak learning rate (AdamW)"),
    "--min-lr": ("min_lr", float, "learning rate at the end of the cosine"),
    "--weight-decay": ("weight_decay", float, "AdamW weight decay (not on norms, biases, positions)"),
    "--warmup-epochs": ("warmup_epochs", float, "linear warm-up epochs before the cosine"),
    "--label-smoothing": ("label_smoothing", float, "label smoothing"),
    "--ema": ("ema", float, "EMA decay of the weights that are scored (0 = off)"),
    "--clip": ("clip", float, "gradient norm clip (0 = off)"),
    "--crop-pad": ("crop_pad", int, "random-crop padding in pixels (-1 = image size / 8)"),
    "--randaugment-n": ("randaugment_n", int, "RandAugment operations per image (0 = off)"),
    "--randaugment-m": ("randaugment_m", float, "RandAugment magnitude (0-30)"),
    "--cutmix": ("cutmix", float, "probability per batch of CutMix"),
    "--mixup": ("mixup", float, "probability per batch of Mixup"),
    "--cutout": ("cutout", int, "Cutout square side in pixels (0 = off)"),
    "--seed": ("seed", int, "seed of the weights, shuffling, augmentation and dropout"),
}


def _add_flags(parser, flags: dict, defaults) -> None:
    for flag, (name, kind, text) in flags.items():
        parser.add_argument(flag, dest=name, type=kind, default=None,
                            help=f"{text} (default {getattr(defaults, name)})")


def _add_data_flags(p, multi: bool = False) -> None:
    if not multi:
        p.add_argument("--dataset", choices=DATASET_CHOICES, default="digits",
                       help="digits (scikit-learn, built in), fashion-mnist (Debian's dataset-fashion-mnist or "
                            "--data-dir), mnist, emnist, cifar10 (from --data-dir) (default digits)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="where MNIST / EMNIST / Fashion-MNIST IDX files and CIFAR-10 python batches are "
                        "(in DIR/mnist, DIR/emnist, DIR/fashion-mnist, DIR/cifar-10-batches-py, or DIR); "
                        "nothing is downloaded")
    p.add_argument("--emnist-split", default="balanced", help="EMNIST split (default balanced, 47 classes)")
    p.add_argument("--train-limit", type=int, default=None, metavar="N",
                   help="use N training images (a fixed subset; default all)")
    p.add_argument("--test-limit", type=int, default=None, metavar="N", help="use N test images (default all)")


def _add_runtime_flags(p) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: the cores not already busy by the load average, 1-8)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars or status lines")


def add_parser(subparsers, run) -> None:
    vit = subparsers.add_parser(
        "vit", help="the vision side: NKAT-ViT with the theta star-product (train, eval, optimize; needs [vit])",
        description="A vision transformer whose linear layers carry the NKAT star-product "
        "y = W x + 0.5 s_l (theta x), theta learnable, low-rank, antisymmetric where square, "
        "s_l = nkat_strength * nkat_decay^l. Needs the [vit] extra (torch, scikit-learn).")
    sub = vit.add_subparsers(dest="vit_command", metavar="SUBCOMMAND")
    t = sub.add_parser("train", help="train on one dataset; prints accuracy, TPE, Robustness",
                       description="Train NKAT-ViT on one dataset and score it on its test split: accuracy (EMA "
                       "weights), TPE = accuracy / log10(1 + 9 (1 + parameters/1e6)), Robustness under a fixed "
                       "corruption set. A checkpoint is written atomically after every epoch; --resume continues it.")
    _add_data_flags(t)
    t.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="start from the issue's CIFAR-10 recipe (stem tiny, patch 2, dim 384, depth 7, RandAugment "
                        "2/9, CutMix 0.2, Mixup 0.1, Cutout 8, lr 2e-4, 5 warm-up epochs, EMA 0.9995, ...); "
                        "other flags override it")
    _add_flags(t, MODEL_FLAGS, ViTConfig())
    t.add_argument("--color-norm", action="store_true", default=None,
                   help="per-pixel LayerNorm over the color channels before the stem (needs >= 2 channels)")
    t.add_argument("--no-star", action="store_true", help="plain linear layers (same as --nkat-strength 0)")
    _add_flags(t, TRAIN_FLAGS, TrainConfig())
    t.add_argument("--no-flip", action="store_true", help="no horizontal flips even where the dataset allows them")
    t.add_argument("--checkpoint", metavar="FILE.pt", help="checkpoint written after every epoch")
    t.add_argument("--resume", action="store_true", help="continue from --checkpoint when it exists")
    t.add_argument("--output", metavar="FILE.json", help="also write the metrics JSON here (atomically)")
    t.add_argument("--no-robustness", action="store_true", help="skip the corrupted-test-set evaluation")
    _add_runtime_flags(t)
    t.set_defaults(func=run)

    e = sub.add_parser("eval", help="score a checkpoint: accuracy, TPE, Robustness",
                       description="Load a checkpoint and score it on its dataset's test split.")
    e.add_argument("--checkpoint", required=True, metavar="FILE.pt")
    e.add_argument("--raw", action="store_true", help="score the raw weights instead of the EMA")
    _add_data_flags(e)
    e.set_defaults(dataset=None)
    _add_runtime_flags(e)
    e.set_defaults(func=run)

    o = sub.add_parser("optimize", help="two-stage Optuna search for the best Global TPE",
                       description="An Optuna (TPE sampler) study over patch size, stem, width, depth, attention "
                       "temperature, top-p and star-product strength. Two-stage objective: a trial counts only if "
                       "its TPE on the gate dataset reaches the bar (stage 1, trained first; a trial below it stops "
                       "there); among those the Global TPE over all datasets present is maximized (stage 2). "
                       "Writes optimization_history.json, optuna_study.json, optimization_results.png and "
                       "best_config.json into --output-dir; the study lives in an SQLite file there (rerun to "
                       "resume) or in --storage (e.g. postgresql://...).")
    _add_data_flags(o, multi=True)
    o.add_argument("--datasets", default=None, metavar="A,B",
                   help="comma-separated datasets (default: every dataset present here)")
    o.add_argument("--gate", default=None, metavar="DATASET=TPE",
                   help="stage-1 bar (default cifar10=0.60 when CIFAR-10 is present, else none; 'none' = off)")
    o.add_argument("--trials", type=int, default=12, help="complete trials in the study (default 12)")
    o.add_argument("--space", choices=("quick", "round2"), default="quick",
                   help="quick: dim 32-96, depth 2-4 (CPU-sized); round2: the issue's dim 384-512, depth 5-9")
    o.add_argument("--epochs", type=int, default=2, help="training epochs per dataset per trial (default 2)")
    o.add_argument("--output-dir", required=True, metavar="DIR")
    o.add_argument("--storage", metavar="URL", help="Optuna RDB URL (default sqlite in --output-dir)")
    o.add_argument("--study-name", default="nkat-vit", help="study to create or resume (default nkat-vit)")
    o.add_argument("--seed", type=int, default=0, help="sampler and training seed (default 0)")
    _add_runtime_flags(o)
    o.set_defaults(func=run)
    vit.set_defaults(func=lambda args: (vit.print_help(), 2)[1])


def _configs(args) -> tuple[ViTConfig, TrainConfig]:
    model, train = ViTConfig().to_dict(), TrainConfig().to_dict()
    if getattr(args, "recipe", None):
        model |= RECIPES[args.recipe]["model"]
        train |= RECIPES[args.recipe]["train"]
    model |= {name: getattr(args, name) for _, (name, _, _) in MODEL_FLAGS.items() if getattr(args, name) is not None}
    train |= {name: getattr(args, name) for _, (name, _, _) in TRAIN_FLAGS.items() if getattr(args, name) is not None}
    if args.color_norm:
        model["color_norm"] = True
    if args.no_star:
        model["nkat_strength"] = 0.0
    if args.no_flip:
        train["flip"] = False
    m, t = ViTConfig.from_dict(model), TrainConfig.from_dict(train)
    m.validate()
    t.validate()
    return m, t


def _gate(text: str | None, datasets: list[str]) -> tuple[str, float] | None:
    if text is None:
        return ("cifar10", 0.60) if "cifar10" in datasets else None
    if text.lower() == "none":
        return None
    name, sep, value = text.partition("=")
    try:
        bar = float(value)
    except ValueError:
        bar = None
    if not sep or bar is None or name not in DATASET_CHOICES:
        raise UserError(f"--gate must be DATASET=TPE (e.g. cifar10=0.60) or none, not {text!r}")
    return name, bar


def _check_limits(args) -> None:
    for flag, value in (("--train-limit", getattr(args, "train_limit", None)), ("--test-limit", args.test_limit)):
        if value is not None and value <= 0:
            raise UserError(f"{flag} must be a positive number of images, not {value}")


def run(args) -> int:
    from nkat_gguf.util.report import print_json, print_table

    if args.vit_command in ("train", "eval", "optimize"):
        _check_limits(args)

    if args.vit_command == "train":
        from nkat_gguf.util.atomic import write_text_atomic
        from nkat_gguf.util.report import to_json

        from .data import load_dataset, subset
        from .train import train

        model_cfg, train_cfg = _configs(args)
        if args.resume and not args.checkpoint:
            raise UserError("--resume needs --checkpoint FILE.pt")
        data = subset(load_dataset(args.dataset, args.data_dir, args.emnist_split), args.train_limit, args.test_limit)
        result = train(data, model_cfg, train_cfg, checkpoint=args.checkpoint, resume=args.resume,
                       device=args.device, threads=args.threads, quiet=args.quiet or args.json,
                       robustness=not args.no_robustness)
        if args.output:
            write_text_atomic(args.output, to_json(result) + "\n")
        if args.json:
            print_json(result)
        else:
            _print_scores(f"nkat vit train: {data.name}", result, print_table)
        return 0
    if args.vit_command == "eval":
        from .data import load_dataset, subset
        from .train import evaluate_checkpoint, load_checkpoint

        dataset = args.dataset or load_checkpoint(args.checkpoint)["dataset"]
        data = subset(load_dataset(dataset, args.data_dir, args.emnist_split), None, args.test_limit)
        result = evaluate_checkpoint(args.checkpoint, data, args.device, args.threads, use_ema=not args.raw)
        if args.json:
            print_json(result)
        else:
            _print_scores(f"nkat vit eval: {data.name}", result, print_table)
        return 0
    if args.vit_command == "optimize":
        from .data import available
        from .optimize import VitOptimizeOptions, run_optimize

        present = available(args.data_dir)
        if args.datasets:
            datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
            bad = [d for d in datasets if d not in DATASET_CHOICES]
            if bad:
                raise UserError(f"--datasets: unknown {', '.join(bad)} (choose from {', '.join(DATASET_CHOICES)})")
        else:
            datasets = [d for d in DATASET_CHOICES if d in present]
        opts = VitOptimizeOptions(
            datasets=datasets, output_dir=args.output_dir, data_dir=args.data_dir,
            gate=_gate(args.gate, datasets), trials=args.trials, space=args.space, epochs=args.epochs,
            train_limit=args.train_limit, test_limit=args.test_limit, storage=args.storage,
            study_name=args.study_name, seed=args.seed, device=args.device, threads=args.threads,
            quiet=args.quiet or args.json)
        summary = run_optimize(opts)
        if args.json:
            print_json(summary)
        else:
            best = summary["best_trial"]
            rows = [(f"trial {r['number']}", r["global_tpe"], r["feasible"]) for r in ([best] if best else [])]
            print_table("nkat vit optimize", ["", "Global TPE", "feasible"], rows,
                        note=f"datasets: {', '.join(summary['datasets_present'])}; trials: {summary['trials']}")
            print(summary["verdict"])
            print(f"wrote {', '.join(summary['files'])} in {summary['output_dir']}")
        return 0
    raise UserError("choose a subcommand: nkat vit train | eval | optimize")


def _print_scores(title: str, r: dict, print_table) -> None:
    rows = [("test accuracy", r["test_accuracy"]), ("parameters", r["parameters"]), ("lambda", r["lambda"]),
            ("TPE", r["tpe"]), ("Robustness", r.get("robustness"))]
    for name, acc in (r.get("corrupted_accuracy") or {}).items():
        rows.append((f"  accuracy under {name}", acc))
    note = f"{r.get('epochs_done')} epochs; device {r['device']}, {r['threads']} threads, {r['cpu']}"
    if r.get("train_seconds_this_run") is not None:
        note += f"; trained {r['train_seconds_this_run']:.1f} s in this run"
    print_table(title, ["", "value"], rows, note=note)
