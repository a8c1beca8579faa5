"""The one error class for data that cannot be used, so that a command can tell bad data from a bug.

Raised for what is on disk or was asked of it (a corrupt or truncated file, an unreadable image, a
folder without class sub-folders, a split that leaves nothing to train on), never for a mistake in
the code; the message names the file or folder and what was expected.
"""


class DataError(ValueError):
    """Data that cannot be used as asked; the message says which file or folder, and why.

    param: when the fault is in a value asked for rather than in the files, the name of that
    parameter (e.g. "val_size"); the message then starts with it, so a command can spell it as its flag.
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
