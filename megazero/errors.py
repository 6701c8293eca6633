"""User-facing errors.

`ConfigError` is raised for anything the *user* got wrong (flags, config files, data paths, tokenizer
files). Its message is one line that says what is wrong and how to fix it. The entry point
(`pretrain_gpt.py`, tools/) turns it into that line on stderr, printed by one rank, and exit code 2.
Internal invariants use `assert`, never this class.
"""


class ConfigError(ValueError):
    """A problem with user input; the message names the problem and the fix."""


class DataError(ConfigError):
    """A problem with a data file, tokenizer or dataset the user pointed at."""
