"""The errors that mean "the user's input is wrong", as opposed to a bug: the ground floor of the package.

It imports nothing from the package (and no torch), so every module can raise these and the CLI can catch them
without importing the modules that raise them.
"""
from __future__ import annotations

import difflib


class InputError(ValueError):
    """Bad user input: the CLI prints it on one line and exits 2 (a bug, any other exception, gets a traceback)."""


class ConfigError(InputError):
    """Bad user input in a config, an override or a search space. The CLI prints it and exits 2."""


class DataError(InputError):
    """Bad data or data spec from the user: one line naming the problem and the fix. The CLI exits 2."""


class ModelError(InputError):
    """Bad user input: unknown model name, missing or unfitting weights file. The CLI prints it and exits 2."""


class ModelFileError(InputError):
    """A file that is not an emotune model/checkpoint, or that carries pickled code."""


class StorageError(InputError):
    """A location that cannot be used: missing bucket or file, unreachable endpoint, missing credentials.
    The CLI prints it and exits 2."""


def did_you_mean(word: str, options, choose_from: bool = False) -> str:
    """"; did you mean 'x'?" for a near miss, else "; valid keys: ..." (choose_from: the hint, then always the
    list, for names like models where seeing the others helps)."""
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else ""
    if choose_from:
        return f"; {hint + ' ' if hint else ''}choose from {', '.join(sorted(options))}"
    return f"; {hint}" if hint else f"; valid keys: {', '.join(sorted(options))}"
