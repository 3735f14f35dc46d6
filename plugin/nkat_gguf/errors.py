"""The one exception type for mistakes a user can make (bad file, bad value).

The CLI prints its message as one line and exits with status 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: one line naming the file, tensor or value at fault."""


class Setting:
    """Names of settings that low layers check. They name a setting, never a CLI flag: the
    command that took the value from a flag words the error with it (BadSetting.worded)."""

    THETA_RANK = "theta rank"
    THETA_TYPE = "theta type"
    THETA_GAMMA = "theta gamma"
    LAYERS = "layer pattern"


class BadSetting(UserError):
    """A setting's value is outside its domain: "<setting> <problem>"."""

    def __init__(self, setting: str, problem: str):
        self.setting, self.problem = setting, problem
        super().__init__(f"{setting} {problem}")

    def worded(self, flags: dict[str, str]) -> UserError:
        """The same error naming the flag that set it (flags: setting -> flag), if there is one."""
        flag = flags.get(self.setting)
        return UserError(f"{flag} {self.problem}") if flag else self
