"""The distributed run's error, importable without MLX (the command line catches it)."""


class DistributedError(RuntimeError):
    """A distributed run failed (a rank died or hangs, a link dropped, ranks disagree); the message
    says which rank and what happened."""
