"""NKAT-ViT with vs without the star-product: same seed, same model, same budget, several
seeds, run alternately in one process. Prints JSON: per-seed accuracies, the difference
(star - plain) with its mean and sample standard deviation, and the train-time ratio.

    python benchmarks/bench_vit_star.py [--dataset digits] [--seeds 0 1 2] [--epochs 10]
        [--train-limit N] [--model-json '{"dim": 32}'] [--train-json '{"lr": 3e-3}']

The model and training settings are nkat_vit's defaults unless overridden; "plain" is the same
model with nkat_strength 0 (StarLinear without theta, i.e. nn.Linear).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from nkat_vit.config import TrainConfig, ViTConfig
from nkat_vit.data import load_dataset, subset
from nkat_vit.train import cpu_name, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model-json", default="{}", help="ViTConfig overrides as JSON")
    ap.add_argument("--train-json", default="{}", help="TrainConfig overrides as JSON")
    args = ap.parse_args()

    data = subset(load_dataset(args.dataset, args.data_dir), args.train_limit, args.test_limit)
    star_cfg = ViTConfig.from_dict(ViTConfig().to_dict() | json.loads(args.model_json))
    plain_cfg = ViTConfig.from_dict(star_cfg.to_dict() | {"nkat_strength": 0.0})
    runs = []
    for seed in args.seeds:
        tcfg = TrainConfig.from_dict(TrainConfig().to_dict() | json.loads(args.train_json)
                                     | {"epochs": args.epochs, "seed": seed})
        row = {"seed": seed}
        # alternate which goes first so a change in machine load does not favour one side
        order = [("star", star_cfg), ("plain", plain_cfg)]
        for name, cfg in (order if seed % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            res = train(data, cfg, tcfg, threads=args.threads, quiet=True)
            row[name] = {"accuracy": res["test_accuracy"], "robustness": res["robustness"], "tpe": res["tpe"],
                         "parameters": res["parameters"], "seconds": time.perf_counter() - t0}
            threads = res["threads"]
        row["difference"] = row["star"]["accuracy"] - row["plain"]["accuracy"]
        runs.append(row)
    diffs = [r["difference"] for r in runs]
    ratios = [r["star"]["seconds"] / r["plain"]["seconds"] for r in runs]
    print(json.dumps({
        "dataset": data.describe(), "epochs": args.epochs, "model": star_cfg.to_dict(),
        "train": TrainConfig.from_dict(TrainConfig().to_dict() | json.loads(args.train_json)).to_dict(),
        "runs": runs,
        "accuracy_star_mean": statistics.fmean(r["star"]["accuracy"] for r in runs),
        "accuracy_plain_mean": statistics.fmean(r["plain"]["accuracy"] for r in runs),
        "difference_mean": statistics.fmean(diffs),
        "difference_std": statistics.stdev(diffs) if len(diffs) > 1 else None,
        "robustness_difference_mean": statistics.fmean(r["star"]["robustness"] - r["plain"]["robustness"] for r in runs),
        "time_ratio_star_over_plain_median": statistics.median(ratios),
        "threads": threads, "cpu": cpu_name(),
    }, indent=2))


if __name__ == "__main__":
    main()
