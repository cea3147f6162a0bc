"""The one exception type the project raises for bad input, so the CLI can print it in one line."""


class SvdsparseError(Exception):
    """Bad input (a file, a tensor, a config value, a CLI argument): the message names it and says what was expected."""
