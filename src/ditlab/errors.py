"""The one error type that the CLI turns into a one-line message and a non-zero exit."""


class DitlabError(Exception):
    """A user-facing error: bad input, a missing file, an incompatible config.

    Raise it with a message that names the problem in one line; `ditlab.cli.main`
    prints `error: <message>` to stderr and exits with status 2.
    """
