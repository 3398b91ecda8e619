"""Errors a person can act on. The main entry prints these as one line (no traceback) and exits 2."""


class UserInputError(ValueError):
  """Bad input from the user: a config value, a data file, a path. The message names it."""


class ConfigError(UserInputError):
  """A config field has a value monojax cannot use; the message names the field."""


class MissingInputError(UserInputError, FileNotFoundError):
  """A configured file or directory does not exist."""


class RunFormatError(UserInputError):
  """A workdir (config.json, checkpoints) that this monojax cannot open; the message says why."""
