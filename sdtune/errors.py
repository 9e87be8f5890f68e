"""The project's error type. Library code raises it (or a subclass) with a message that names the input and the fix;
only an entry point's `main` turns it into an exit message, with `exit_on_error`."""

from contextlib import contextmanager


class SdtuneError(Exception):
    """Something the user can fix: a bad flag, file, dataset or model. The message says what and how."""


@contextmanager
def exit_on_error():
    """Run a command line's work: an SdtuneError ends the program with its message (exit status 1), not a traceback.
    Also a decorator: `@exit_on_error()` on a `main`."""
    try:
        yield
    except SdtuneError as error:
        raise SystemExit(str(error)) from error
