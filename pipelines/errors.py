"""Errors the CLI reports as one line, kept free of heavy imports so that `loramill validate` stays fast."""


class TrainingFailed(RuntimeError):
    """A domain's run failed for good (its restarts used up); the message names the domain and the cause."""


class TrackingUnavailable(RuntimeError):
    """``tracking.mlflow_uri`` names a store that cannot be opened; the message names it and the fix."""
