"""Errors a person can act on. The main entry prints these as one line (no traceback) and exits 2."""
import argparse
import sys


class UserInputError(ValueError):
  """Bad input from the user: a config value, a data file, a path. The message names it."""


class ConfigError(UserInputError):
  """A config field has a value monojax cannot use; the message names the field."""


class MissingInputError(UserInputError, FileNotFoundError):
  """A configured file or directory does not exist."""


class RunFormatError(UserInputError):
  """A workdir (config.json, checkpoints) that this monojax cannot open; the message says why."""


class ArgumentParser(argparse.ArgumentParser):
  """A verb's flag parser whose errors are one line, `monojax.<verb>: <message> (see --help)`, exit 2
  (argparse would print the whole usage first). The verb is read from prog ("python -m monojax.X")."""

  def error(self, message):
    verb = next((w for w in self.prog.split() if w.startswith("monojax")), "monojax")
    print(f"{verb}: {message} (see --help)", file=sys.stderr)
    sys.exit(2)
