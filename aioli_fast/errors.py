"""Errors that the command line turns into one clear message and a non-zero exit."""


class AioliError(ValueError):
    """A problem with the user's input (config, data, paths): the message says what and where."""


class DataError(AioliError):
    """Bad or missing data: a shard, a manifest, an input file. The message names the file."""


class ShardMissingError(DataError):
    """A shard the manifest lists is not on disk (deleted, or the corpus is incomplete on this node)."""


class ConfigError(AioliError):
    """An invalid configuration: an unknown key, a wrong type, conflicting options."""
