"""The plugin's one error hierarchy (plain Python, importable from every layer).

Every error the plugin raises on purpose derives from ``MatryoshkaError``. Those caused
by a bad value from the user (a flag, a config field, a path, a checkpoint on disk)
derive from ``UsageError``, which the console scripts turn into one
``prog: error: ...`` line and a non-zero exit (``matryoshka_plugin.cli.runner``). The
message always names the bad value and what is allowed.

The subclasses say where the bad value was found; catching ``UsageError`` catches all
of them. They stay ``ValueError`` (or ``RuntimeError``) subclasses so that callers of
the Python API who catch the built-in types keep working.
"""


class MatryoshkaError(Exception):
    """Base of every error the plugin raises on purpose."""


class UsageError(MatryoshkaError, ValueError):
    """A value given by the user is not allowed; the message names it and what is."""


class MatryoshkaConfigError(UsageError):
    """A Matryoshka option has a value that is not allowed; the message says which."""


class CheckpointError(UsageError):
    """A checkpoint or coder directory on disk is missing, corrupt or not the expected kind."""


class ExportError(UsageError):
    """A circuit-tracer export cannot be written or read as asked."""


class CLTError(UsageError):
    """A cross-layer transcoder config, cache or checkpoint is not usable."""


class GlobalGraphError(UsageError):
    """An input to the global feature graph is not usable."""


class CausalError(UsageError):
    """A feature patch is not well defined."""


class OfflineAssetError(MatryoshkaError, RuntimeError):
    """A local model, tokenizer or corpus the offline default needs is not there."""


class AssetError(MatryoshkaError, RuntimeError):
    """The viewer's vendored JavaScript libraries are missing or cannot be vendored."""


class PeerLostError(MatryoshkaError, RuntimeError):
    """Another rank of a distributed run died or stopped answering; this rank stopped."""


class CLTTrainingInstalledError(MatryoshkaError, RuntimeError):
    """The installed ``sparsify`` is EleutherAI clt-training, not PyPI eai-sparsify."""


class CLTTrainingNotInstalledError(MatryoshkaError, RuntimeError):
    """The installed ``sparsify`` is PyPI eai-sparsify, not EleutherAI clt-training."""
