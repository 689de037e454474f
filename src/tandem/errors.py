"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """A mistake the user can fix (bad config value, missing file, tampered bundle, ...).

    The message says what was wrong and what to do; it is shown without a traceback.
    """
