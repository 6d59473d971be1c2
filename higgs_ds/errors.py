"""The one base class of every error that is the user's to fix (bad input, bad config, bad path).

The CLI prints these as one clear line and exits 2; anything else is a bug and keeps its traceback."""


class UserError(ValueError):
    pass
