"""Training and evaluation: AdamW, warm-up then cosine, EMA, gradient clipping, label smoothing,
the augmentations of nkat_vit.augment, atomic checkpoints after every epoch and exact resume.

Reproducibility: the shuffle order, the augmentations and dropout of epoch e are drawn from
generators seeded by (seed, e), so training epochs 0..E-1 in one run or in two (stop, resume from
the checkpoint) gives the same weights on the same device and thread count.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
from nkat_gguf.util.atomic import atomic_path
from nkat_gguf.errors import UserError
from nkat_gguf.util.report import cpu_name, progress
from torch.nn import functional as F

from . import augment, metrics
from .config import TrainConfig, ViTConfig
from .data import ImageData
from .model import NKATViT

CHECKPOINT_VERSION = 1


def select_device(name: str = "auto") -> torch.device:
    """cuda when present (or asked for), else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device must be auto, cpu or cuda[:N], not {name!r}") from None


def default_threads() -> int:
    """The cores this process may use that are not already busy (1-minute load average), 1..8.

    On a shared machine torch's OpenMP threads spin-wait for each other: measured here (2 cores,
    load ~5), a 64x64 linear's forward+backward ran 100x slower with 2 threads than with 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(8, cores, int(cores - busy + 0.5)))


def set_threads(threads: int | None) -> int:
    """torch's intra-op threads: the given number, else default_threads()."""
    if threads is None:
        threads = default_threads()
    if threads <= 0:
        raise UserError(f"--threads must be positive, not {threads}")
    torch.set_num_threads(threads)
    return threads



def model_config_for(data: ImageData, cfg: ViTConfig) -> ViTConfig:
    """The model settings with the dataset's image size, channels and classes filled in."""
    d = cfg.to_dict() | {"image_size": data.image_size, "in_channels": data.channels, "num_classes": data.num_classes}
    return ViTConfig.from_dict(d)


def _normalize(x: torch.Tensor, data: ImageData) -> torch.Tensor:
    mean = torch.tensor(data.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def _generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 7 + stream) % (2**63))


class EMA:
    """An exponential moving average of the weights (and a copy of the buffers)."""

    def __init__(self, model: NKATViT, decay: float):
        self.decay = decay
        self.updates = 0
        self.model = NKATViT(model.cfg).to(next(model.parameters()).device)
        self.model.load_state_dict(model.state_dict())
        self.model.eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: NKATViT) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.mul_(d).add_(p.detach(), alpha=1 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


def lr_at(step: int, total: int, warmup: int, cfg: TrainConfig) -> float:
    if warmup and step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress_ = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress_)))


def _param_groups(model: NKATViT, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name == "pos" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def accuracy(model: NKATViT, data: ImageData, device: torch.device, batch_size: int = 512,
             corruption: str | None = None) -> float:
    """Top-1 accuracy on the test split, optionally under one of metrics.CORRUPTIONS."""
    model.eval()
    gen = torch.Generator().manual_seed(metrics.CORRUPTION_SEED)
    correct = 0
    for i in range(0, len(data.y_test), batch_size):
        x = data.x_test[i:i + batch_size].float() / 255.0
        if corruption:
            x = metrics.corrupt(x, corruption, gen)
        logits = model(_normalize(x.to(device), data))
        correct += int((logits.argmax(1).cpu() == data.y_test[i:i + batch_size]).sum())
    return correct / len(data.y_test)


def robustness_report(model: NKATViT, data: ImageData, device: torch.device, clean: float) -> dict:
    corrupted = {name: accuracy(model, data, device, corruption=name) for name in metrics.CORRUPTIONS}
    return {"robustness": metrics.robustness(clean, corrupted), "corrupted_accuracy": corrupted}


# -- checkpoints -----------------------------------------------------------------------------------
def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged or foreign file
        raise UserError(f"{path}: not an nkat vit checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != "nkat-vit" or state.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path}: not an nkat vit checkpoint (version {CHECKPOINT_VERSION})")
    return state


def model_from_checkpoint(state: dict, use_ema: bool = True) -> NKATViT:
    model = NKATViT(ViTConfig.from_dict(state["model_config"]))
    weights = state["ema"] if use_ema and state.get("ema") is not None else state["model"]
    model.load_state_dict(weights)
    return model


# -- the loop --------------------------------------------------------------------------------------
def train(data: ImageData, model_cfg: ViTConfig, cfg: TrainConfig, *, checkpoint: str | Path | None = None,
          resume: bool = False, device: str = "auto", threads: int | None = None, quiet: bool = False,
          stop_after_epochs: int | None = None, robustness: bool = True) -> dict:
    """Train on data.train, score on data.test; returns the metrics dict (see nkat vit train --json).

    stop_after_epochs ends the run early after that many epochs in total (as if interrupted;
    the checkpoint then resumes it)."""
    cfg.validate()
    dev = select_device(device)
    n_threads = set_threads(threads)
    model_cfg = model_config_for(data, model_cfg)
    ckpt_path = Path(checkpoint) if checkpoint else None
    state = load_checkpoint(ckpt_path) if resume and ckpt_path and ckpt_path.exists() else None
    if resume and state is None and ckpt_path is None:
        raise UserError("--resume needs --checkpoint")
    if state is not None:
        if state["dataset"] != data.name or state["model_config"] != model_cfg.to_dict() or \
                state["train_config"] != cfg.to_dict():
            raise UserError(f"{ckpt_path}: was written for another dataset or other settings; "
                            "drop --resume or choose another --checkpoint")

    torch.manual_seed(cfg.seed)
    model = NKATViT(model_cfg).to(dev)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
    history: list[dict] = []
    start_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.model.load_state_dict(state["ema"])
            ema.updates = state["ema_updates"]
        history = list(state["history"])
        start_epoch = state["epoch"]

    n = len(data.y_train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    pad = data.image_size // 8 if cfg.crop_pad < 0 else cfg.crop_pad
    do_flip = cfg.flip and data.flip_ok
    end_epoch = cfg.epochs if stop_after_epochs is None else min(cfg.epochs, stop_after_epochs)
    started = time.perf_counter()
    for epoch in range(start_epoch, end_epoch):
        t0 = time.perf_counter()
        model.train()
        torch.manual_seed(cfg.seed * 1_000_003 + epoch)  # dropout
        order = torch.randperm(n, generator=_generator(cfg.seed, epoch, 0))
        gen = _generator(cfg.seed, epoch, 1)
        loss_sum, correct, seen = 0.0, 0, 0
        bar = progress(range(steps_per_epoch), desc=f"{data.name} epoch {epoch + 1}/{cfg.epochs}", quiet=quiet,
                       unit="batch")
        for i in bar:
            step = epoch * steps_per_epoch + i
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            x = data.x_train[idx].float() / 255.0
            y = data.y_train[idx]
            x = augment.rand_augment(x, cfg.randaugment_n, cfg.randaugment_m, gen)
            x = augment.random_crop(x, pad, gen)
            if do_flip:
                x = augment.flip(x, gen)
            x = augment.cutout(x, cfg.cutout, gen)
            x, y_a, y_b, lam = augment.mix(x, y, cfg.cutmix, cfg.mixup, gen)
            x, y_a, y_b = _normalize(x.to(dev), data), y_a.to(dev), y_b.to(dev)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup, cfg)
            logits = model(x)
            loss = lam * F.cross_entropy(logits, y_a, label_smoothing=cfg.label_smoothing)
            if lam < 1.0:
                loss = loss + (1 - lam) * F.cross_entropy(logits, y_b, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            if ema is not None:
                ema.update(model)
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y_a).sum())
            seen += len(idx)
        scored = ema.model if ema is not None else model
        test_acc = accuracy(scored, data, dev)
        history.append({"epoch": epoch + 1, "loss": loss_sum / seen, "train_accuracy": correct / seen,
                        "test_accuracy": test_acc, "seconds": time.perf_counter() - t0})
        if ckpt_path is not None:
            save_checkpoint(ckpt_path, {
                "format": "nkat-vit", "version": CHECKPOINT_VERSION, "epoch": epoch + 1, "dataset": data.name,
                "normalization": {"mean": data.mean, "std": data.std},
                "model_config": model_cfg.to_dict(), "train_config": cfg.to_dict(),
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "ema": ema.model.state_dict() if ema is not None else None,
                "ema_updates": ema.updates if ema is not None else 0, "history": history,
            })
    finished = len(history) >= cfg.epochs
    scored = ema.model if ema is not None else model
    return report(data, scored, model, dev, n_threads, model_cfg, cfg, history, finished,
                  time.perf_counter() - started, robustness, str(ckpt_path) if ckpt_path else None)


def report(data: ImageData, scored: NKATViT, raw: NKATViT, dev, n_threads: int, model_cfg: ViTConfig,
           cfg: TrainConfig, history: list[dict], finished: bool, seconds: float, robustness: bool,
           checkpoint: str | None) -> dict:
    clean = accuracy(scored, data, dev)
    params = scored.parameter_count()
    out = {
        "dataset": data.describe(),
        "finished": finished,
        "epochs_done": len(history),
        "test_accuracy": clean,
        "test_accuracy_raw": accuracy(raw, data, dev) if raw is not scored else clean,
        "scored_weights": "ema" if raw is not scored else "raw",
        "parameters": params,
        "theta_parameters": scored.theta_parameter_count(),
        "lambda": metrics.complexity(params),
        "tpe": metrics.tpe(clean, params),
        "model_config": model_cfg.to_dict(),
        "train_config": cfg.to_dict(),
        "history": history,
        "train_seconds_this_run": seconds,
        "device": str(dev),
        "threads": n_threads,
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "checkpoint": checkpoint,
    }
    if robustness:
        out.update(robustness_report(scored, data, dev, clean))
    return out


def evaluate_checkpoint(path: str | Path, data: ImageData, device: str = "auto", threads: int | None = None,
                        use_ema: bool = True) -> dict:
    state = load_checkpoint(path)
    if state["dataset"] != data.name:
        raise UserError(f"{path}: trained on {state['dataset']}, not {data.name}")
    data.mean, data.std = state["normalization"]["mean"], state["normalization"]["std"]
    dev = select_device(device)
    n_threads = set_threads(threads)
    model = model_from_checkpoint(state, use_ema).to(dev)
    clean = accuracy(model, data, dev)
    params = model.parameter_count()
    return {"dataset": data.describe(), "checkpoint": str(path), "epochs_done": state["epoch"],
            "weights": "ema" if use_ema and state.get("ema") is not None else "raw",
            "test_accuracy": clean, "parameters": params, "lambda": metrics.complexity(params),
            "tpe": metrics.tpe(clean, params), "device": str(dev), "threads": n_threads, "cpu": cpu_name(),
            "model_config": state["model_config"]} | robustness_report(model, data, dev, clean)
