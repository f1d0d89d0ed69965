"""The exceptions the stages' command line turns into one line: bad input (exit code 2), and a
service that stayed away past its retries (exit code 1)."""


class UsageError(Exception):
    """Bad input from the user (params, paths, data): reported as one line, exit code 2. The
    message names what is wrong (the file, the key, the valid values) and how to put it right."""


class TrackingUnavailable(Exception):
    """The MLflow store did not answer within `mlflow.retry_seconds` (pipeline.tracking.Store)."""
