"""Errors that a user can act on. Every command catches them at its boundary (pretrain.cli) and
prints their one message, which names the setting, file or folder and what to do; any other
exception is a bug and keeps its traceback."""


class UserError(Exception):
    """A problem with what the user gave (a setting, a file, a folder) or with the state it left."""

    exit_code = 2
