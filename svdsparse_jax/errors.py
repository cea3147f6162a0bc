"""The one exception type the project raises for bad input, so the CLI can print it in one line."""


class SvdsparseError(Exception):
    """Bad input (a file, a tensor, a config value, a CLI argument): the message names it and says what was expected."""


def is_int(value) -> bool:
    """An integer (Python or NumPy), not a bool: what an integer field or argument accepts."""
    import numpy as np
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A finite real number (Python or NumPy int or float), not a bool."""
    import math

    import numpy as np
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(value)
