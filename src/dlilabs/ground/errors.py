"""The one exception type a user can fix by themselves (bad config, bad data, no network)."""


class UserError(Exception):
    """A problem the user can fix; stages print its message without a traceback and exit 2."""
