"""The one exception type for mistakes a user can make (bad file, bad value).

The CLI prints its message as one line and exits with status 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: one line naming the file, tensor or value at fault."""


class SettingName(str):
    """A setting's name inside a BadSetting message: where a command's flag stands when worded."""


class Setting:
    """Names of settings that low layers check. They name a setting, never a CLI flag: the
    command that took the value from a flag words the error with it (BadSetting.worded)."""

    THETA_RANK = SettingName("theta rank")
    THETA_TYPE = SettingName("theta type")
    THETA_GAMMA = SettingName("theta gamma")
    LAYERS = SettingName("layer pattern")
    SOURCE = SettingName("theta source")
    STRUCTURE = SettingName("theta structure")
    REFERENCE = SettingName("reference model")
    IMATRIX = SettingName("imatrix")
    COVARIANCE = SettingName("covariance file")
    GPTQ_DAMP = SettingName("GPTQ damping")
    GPTQ_COVARIANCE = SettingName("GPTQ covariance file")  # nkat mix --gptq
    QUANT_METHOD = SettingName("quantization method")
    BUDGET_MB = SettingName("budget in MiB")
    BUDGET_PCT = SettingName("budget in percent of the base")
    MAX_MATRICES = SettingName("matrix limit")
    MODEL = SettingName("a model path")
    THETA = SettingName("a theta path")
    MODELS_DIR = SettingName("a models directory")
    EVAL_TEXT = SettingName("evaluation text")
    CALIB_TEXT = SettingName("calibration text")
    CTX = SettingName("context length")
    CHUNKS = SettingName("chunk count")
    FINAL_CHUNKS = SettingName("final chunk count")
    MAX_KLD = SettingName("KLD limit")
    MAX_OVERHEAD = SettingName("overhead limit")
    STUDY_NAME = SettingName("study name")
    MODE = SettingName("study mode")
    TRIALS = SettingName("trial count")
    GAMMA = SettingName("gamma")
    BACKEND = SettingName("theta backend")
    QUANT_TYPE = SettingName("quant type")
    TENSOR_TYPE = SettingName("tensor type rule")
    OUTPUT = SettingName("output")
    OUTPUT_DIR = SettingName("output directory")


class BadSetting(UserError):
    """A setting's value is outside its domain. The message comes in parts: text, and Setting
    names where the flag that set them stands once a command words it, e.g.
    BadSetting(Setting.THETA_RANK, "must be positive, not 0") reads "theta rank must be positive,
    not 0", and "--theta-rank must be positive, not 0" from nkat convert. Parts are joined by a
    space, except after "(" and before , . ; : )."""

    def __init__(self, *parts: str):
        self.parts = parts
        super().__init__(self._text({}))

    def _text(self, flags: dict[str, str]) -> str:
        words = [flags.get(p, p) if isinstance(p, SettingName) else p for p in self.parts]
        text = words[0]
        for before, word in zip(words, words[1:]):
            text += ("" if before.endswith("(") or word[:1] in ",.;:)" else " ") + word
        return text

    def worded(self, flags: dict[str, str]) -> UserError:
        """The same error naming the flags that set its settings (flags: setting -> flag)."""
        return UserError(self._text(flags))
