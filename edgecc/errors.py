"""Error types. A UserError is the user's to fix: the CLI prints it as one line, exit code 2."""


class EdgeccError(Exception):
    """Base of every error edgecc raises on purpose."""


class UserError(EdgeccError):
    """Bad input: a file, option, pipeline, target or model the user gave."""


class VerificationError(EdgeccError):
    """A compiled artifact or a rewritten model disagrees with the reference."""
