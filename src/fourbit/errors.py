"""The one error fourbit raises for bad input: a file, a setting, a model or an adapter it cannot
use, named in one line with what is allowed. The command line prints it and exits with status 2;
any other exception is a fault of fourbit's (or of a library under it) and keeps its traceback.
It is a ValueError, so code that catches ValueError keeps working."""


class InputError(ValueError):
    """Bad input, said in one line: what is wrong and what is allowed."""


# What a front end (the command line, the web UI) reports as one line, without a traceback:
# fourbit's own input errors, files that are missing, in the way or not readable, a hub that
# cannot be reached, a training run whose loss diverged.
USER_ERRORS = (InputError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, ConnectionError, FloatingPointError)


def one_line(error: BaseException) -> str:
    """How a front end shows ``error``: a user error's own words; anything else with its type, as
    a fault of fourbit's (or of a library under it) to report."""
    return str(error) if isinstance(error, USER_ERRORS) else f"{type(error).__name__}: {error}"
