"""The one base class for errors a user can act on (bad input, missing model, no isolation).

The command line prints them as one line and exits with code 2; a bug is never one of them.
Kept in its own module so that catching them imports nothing else.
"""


class BDCError(Exception):
    """An error the user can act on."""
