"""Command-line helpers for the bundle's jobs: flags that mean what they say, one-line error reports.

``python -m monai.bundle run ... --stl false`` hands the config the *string* "false" (Fire only turns
Python literals such as ``False`` into booleans), and a non-empty string is true; configs therefore
read every boolean option through :func:`as_bool`. MONAI wraps an error raised while a config is
evaluated in "Failed to evaluate/instantiate ..." RuntimeErrors; :func:`install_error_report` makes
a job end on the original message instead (configs call it first in ``run``: they have no ``initialize``, see
docs/bundle_checks.md).
"""

from __future__ import annotations

import logging
import sys
import traceback

__all__ = ["BatchError", "as_bool", "root_cause", "install_error_report"]

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")

logger = logging.getLogger(__name__)


class BatchError(Exception):
    """Some cases of a batch failed (the others were processed); the message lists each file and reason."""


def as_bool(value, name: str) -> bool:
    """A flag as given in a config or on the command line -> bool.

    Accepts booleans, the integers 0 / 1 and the words true/false, yes/no, on/off, 1/0 in any case;
    anything else raises ValueError naming the option ``--<name>``.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS or word in FALSE_WORDS:
            return word in TRUE_WORDS
    raise ValueError(
        f"--{name}: expected true or false ({'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)}), got {value!r}"
    )


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception of an ``raise ... from`` chain (MONAI's config wrappers use ``from``)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _report(exc_type, exc, tb) -> None:
    """sys.excepthook: a user-facing error (ValueError, including MaskError, OSError such as a missing
    or existing file, BatchError) prints as one ``ERROR: <message>`` line, its traceback only at DEBUG
    level; any other error prints the traceback of its root cause (without MONAI's wrappers)."""
    cause = root_cause(exc)
    if isinstance(cause, (ValueError, OSError, BatchError)):
        logger.debug("traceback of the error below", exc_info=(exc_type, exc, tb))
        print(f"ERROR: {cause}", file=sys.stderr)
    else:
        traceback.print_exception(cause, file=sys.stderr)


def install_error_report() -> None:
    """Make uncaught errors of this process end in the root cause's message (see :func:`_report`)."""
    sys.excepthook = _report
