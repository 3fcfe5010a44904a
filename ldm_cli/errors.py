"""The one exception type for mistakes a user can make (bad flag, bad file, bad model)."""


class LdmError(Exception):
    """A user-caused problem. The CLI prints its message on one line and exits 2.

    The message names the problem and, where there is one, what to do about it.
    """
