"""User-facing errors: one clear line naming the bad file or flag."""


class PNIError(Exception):
    """An error caused by user input (a file, folder or flag); printed as one line."""
