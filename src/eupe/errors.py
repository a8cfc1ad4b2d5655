"""Errors that the CLI reports as one line instead of a traceback."""


class EupeError(Exception):
    """Base class: a user-facing error whose message says what is wrong and how to fix it.

    `exit_code` is the CLI's exit status for it: 2 for bad input (configs, files, start-up).
    """

    exit_code = 2


class CheckpointError(EupeError, ValueError):
    """A weights file could not be read or does not fit the model it was loaded into."""


class ConfigError(EupeError, ValueError):
    """A configuration value is missing, of the wrong type, or inconsistent."""


class TrainingDiverged(EupeError):
    """The loss or the gradients became NaN/inf (distillation or VLM training); every rank stopped
    before its next checkpoint, so the last complete one is intact and a rerun resumes from it.

    Its own exit code (3), so a job script can tell a diverged run from bad input and retry with a
    lower learning rate instead of fixing the config.
    """

    exit_code = 3
