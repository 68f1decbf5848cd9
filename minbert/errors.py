"""The errors minbert raises for bad input. Scripts turn them into a one-line message and an exit code
(ConfigError: 2, a usage error; the others: 1); in a notebook they are ordinary exceptions."""
import errno


class MinbertError(Exception):
    """Bad input that the user can fix; the message is one line naming the file or flag and the fix."""


class ConfigError(MinbertError, ValueError):
    """An option, or a combination of options, that cannot work."""


class CheckpointError(MinbertError, ValueError):
    """A checkpoint that cannot be found, read or does not fit the model."""


class RunError(MinbertError):
    """A training run that cannot start or continue (output folder busy, unwritable or inconsistent)."""


class WriteError(MinbertError, OSError):
    """A file that could not be written (a full disk, a file-size limit, no permission); still an OSError, with
    the `errno` and `strerror` of the kernel's error and `filename` the file meant, not its temporary name."""

    def __init__(self, path, cause: OSError):
        super().__init__(f"cannot write {path}: {cause.strerror or cause}{os_error_hint(cause)}")
        self.errno, self.strerror, self.filename = cause.errno, cause.strerror, str(path)

    def __str__(self) -> str:  # the message, not OSError's "[Errno N] ..."
        return self.args[0]


def os_error_hint(err: OSError) -> str:
    """What to do about a failed read or write, by its errno (empty when there is no general advice)."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return " (the disk or quota is full: free space, or write somewhere else)"
    if err.errno == errno.EFBIG:
        return " (a file-size limit was reached, see `ulimit -f`: raise it, or write somewhere else)"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return " (check the permissions of the file and its folder)"
    return ""
