"""The errors minbert raises for bad input. Scripts turn them into a one-line message and an exit code
(ConfigError: 2, a usage error; the others: 1); in a notebook they are ordinary exceptions."""


class MinbertError(Exception):
    """Bad input that the user can fix; the message is one line naming the file or flag and the fix."""


class ConfigError(MinbertError, ValueError):
    """An option, or a combination of options, that cannot work."""


class CheckpointError(MinbertError, ValueError):
    """A checkpoint that cannot be found, read or does not fit the model."""


class RunError(MinbertError):
    """A training run that cannot start or continue (output folder busy, unwritable or inconsistent)."""
