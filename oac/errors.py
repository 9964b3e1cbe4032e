"""One exception type for bad input, so the job runner can print a single clear line and stop."""


class ConfigError(ValueError):
    """Raised for invalid user input: unknown model/method, bad bit-width, missing data, ..."""
