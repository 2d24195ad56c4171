"""The one exception type for problems a user can fix (bad flags, data, paths, missing hardware).

The CLI turns a TunelabError into one clear line on stderr and exit code 2; anything else is a bug and keeps its
traceback. Library code raises it with a message that names the file, row, column or flag at fault.
"""


class TunelabError(Exception):
    """A problem with the user's input or machine, explained in its message."""


class ConfigError(TunelabError):
    """A parameter, flag or config key that cannot be used as given."""


class DataError(TunelabError):
    """A data file, row or column that cannot be used as given."""
