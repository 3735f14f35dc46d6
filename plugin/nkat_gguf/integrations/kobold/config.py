"""The .kcpps files: KoboldCpp's JSON of launcher argument names and values, one per NKAT model.

A config holds only options the installed launcher's --help lists, so the same code serves 1.76
(`--lora FILE [BASE]`, no `--loramult`, no admin mode) and the current release.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ...util.atomic import write_text_atomic
from ...errors import UserError
from .discovery import DEFAULT_CONTEXT, DEFAULT_PORT, Backend, Launcher, NkatModel, PlainModel

# argparse defaults that have stayed the same from 1.76 to the current release. A .kcpps holds
# every option the launcher lists whose default is known here, so switching configs in admin mode
# never inherits a value (a LoRA, a GPU flag) from the config loaded before it.
KNOWN_DEFAULTS = {
    "config": None, "tensor_split": None, "blasthreads": 0, "ropeconfig": [0.0, 10000.0],
    "debugmode": 0, "onready": "", "benchmark": None, "prompt": "", "multiuser": 1,
    "preloadstory": "", "ssl": None, "mmproj": "", "draftmodel": "", "password": None,
    "forceversion": 0, "quantkv": 0, "moeexperts": -1, "hordemodelname": "",
    "hordeworkername": "", "hordekey": "", "hordemaxctx": 0, "hordegenlen": 0, "sdmodel": "",
    "sdthreads": 0, "sdclamped": 0, "sdvae": "", "sdlora": "", "sdloramult": 1.0,
    "whispermodel": "", "ttsmodel": "", "embeddingsmodel": "", "admindir": "",
    "adminpassword": None, "maingpu": -1, "savedatafile": "", "ratelimit": 0,
    "overridekv": "", "overridetensors": "", "hordeconfig": None, "sdconfig": None,
}


@dataclass
class RunSettings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    context_size: int = DEFAULT_CONTEXT
    threads: int = max(1, (os.cpu_count() or 2) // 2)
    gpu_layers: int | None = None      # None: all that fit (-1) on a GPU, 0 on the CPU
    lora_mult: float = 1.0


def kcpps_config(model: NkatModel | PlainModel, launcher: Launcher, backend: Backend, settings: RunSettings) -> dict:
    """A complete .kcpps for this launcher: only options its --help lists, NKAT values on top
    (a PlainModel gets no LoRA)."""
    if settings.lora_mult != 1.0 and not launcher.has_loramult:
        raise UserError(f"KoboldCpp {launcher.version or '(this version)'} has no --loramult; "
                        "drop --lora-mult (theta is applied at the gamma stored in the .nkat)")
    gpu_layers = settings.gpu_layers if settings.gpu_layers is not None else (0 if backend.name == "cpu" else -1)
    wanted = {
        "model": [str(model.base)] if _model_takes_list(launcher) else str(model.base),
        "model_param": str(model.base),
        "lora": [str(model.theta)] if model.theta else None,  # None clears a LoRA in admin mode
        "loramult": settings.lora_mult,
        "host": settings.host,
        "port": settings.port,
        "port_param": settings.port,
        "contextsize": settings.context_size,
        "threads": settings.threads,
        "gpulayers": gpu_layers,
        "skiplauncher": True,
        "showgui": False,
        "launch": False,
        "onready": "",
        **backend.config,
    }
    config = {}
    for dest, option in launcher.options.items():
        if dest in wanted:
            config[dest] = wanted[dest]
        elif not option.takes_value:
            config[dest] = False
        elif dest in KNOWN_DEFAULTS:
            config[dest] = KNOWN_DEFAULTS[dest]
    for name in launcher.positionals:
        if name in wanted:
            config[name] = wanted[name]
    config["istemplate"] = False
    return config


def _model_takes_list(launcher: Launcher) -> bool:
    option = launcher.options.get("model")
    return bool(option and "..." in option.invocation)


def render_kcpps(config: dict) -> str:
    return json.dumps(config, indent=2, ensure_ascii=False) + "\n"


def prepare_admindir(admindir: Path) -> Path:
    try:
        admindir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--admindir {admindir}: cannot create it ({exc.strerror or exc})") from None
    if not admindir.is_dir() or not os.access(admindir, os.W_OK | os.X_OK):
        raise UserError(f"--admindir {admindir}: not a writable directory")
    return admindir


def register_models(models: list[NkatModel | PlainModel], launcher: Launcher, backend: Backend,
                    settings: RunSettings, admindir: Path) -> list[Path]:
    """One <name>.kcpps per model; everything is built before anything is written."""
    if not models:
        raise UserError("no NKAT models to register (no .nkat in the models directory; pass --theta FILE)")
    admindir = prepare_admindir(admindir)
    names = [m.name for m in models]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"two .nkat files share the name {duplicates[0]}: rename one before registering")
    texts = {admindir / f"{m.name}.kcpps": render_kcpps(kcpps_config(m, launcher, backend, settings))
             for m in models}
    written: list[Path] = []
    try:
        for path, text in texts.items():
            existed = path.exists()
            write_text_atomic(path, text)
            if not existed:
                written.append(path)
    except OSError as exc:
        for path in written:               # leave the directory as it was
            path.unlink(missing_ok=True)
        raise UserError(f"--admindir {admindir}: writing failed ({exc.strerror or exc})") from None
    return list(texts)
