"""The base class of bad-input errors: a config, data file, cache shard, manifest or teacher that
the user must fix. Each subclass's message names the field, file or shard and says what to do;
the CLI prints it and exits with status 2 (no traceback). It lives alone so that catching it
imports nothing heavy (a `kdflow prep` never loads torch). A message naming a URL names it
without the credentials the URL may carry (`kd_core.redaction`)."""

from kd_core.redaction import redact


class InputError(ValueError):
    """Bad input, reported by name before any expensive work starts."""

    def __init__(self, *args):
        super().__init__(*(redact(arg) if isinstance(arg, str) else arg for arg in args))
