"""``UserError``: a mistake in the user's flags, files or data, raised anywhere in common/ and the scripts.

It lives below every other module (this one imports nothing) so that the output-folder and checkpoint code can raise
it without importing the command-line plumbing (common/cli.py), which imports them; ``common.cli.UserError`` is
this same class.
"""


class UserError(Exception):
    """A mistake in the user's flags, files or data. Printed as ``error: <message>``, exit status 2; raised as is by
    the Python entries (``run_sft`` and the others)."""
