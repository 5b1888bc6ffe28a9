"""User-facing errors: main prints `jaxgen: error: <message>` (one line, no traceback) and exits non-zero."""


class UserError(Exception):
    """Bad input the user can fix (config, data path, checkpoint). The message says what is wrong and how to fix it."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class CheckpointError(UserError):
    pass
