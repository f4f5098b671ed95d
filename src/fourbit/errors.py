"""The one error fourbit raises for bad input: a file, a setting, a model or an adapter it cannot
use, named in one line with what is allowed. The command line prints it and exits with status 2;
any other exception is a fault of fourbit's (or of a library under it) and keeps its traceback.
It is a ValueError, so code that catches ValueError keeps working."""


class InputError(ValueError):
    """Bad input, said in one line: what is wrong and what is allowed."""
