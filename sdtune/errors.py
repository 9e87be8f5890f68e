"""The project's error type. Library code raises it (or a subclass) with a message that names the input and the fix;
only an entry point's `main` turns it into an exit message."""


class SdtuneError(Exception):
    """Something the user can fix: a bad flag, file, dataset or model. The message says what and how."""
