"""Reading the plugin's own ``.pt`` state files as data, never as code.

A ``.pt`` file is a pickle, and unpickling an untrusted one runs whatever it names
(``os.system`` included), so a resume must not trust a checkpoint directory someone
else wrote. ``load_plain_state`` reads with ``torch.load(weights_only=True)``:
tensors, numbers, strings, lists, tuples and dicts only (what the plugin's optimizer,
scheduler and sampler states hold). Anything else, and any corrupt file, is one
line naming the file.
"""

import pickle
import warnings
from pathlib import Path

import torch

from .errors import CheckpointError, UsageError


def _reason(error: BaseException) -> str:
    """The informative line of torch's long weights-only message (or the first line)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if line.startswith(("Trying to load", "Unsupported"))]
    return (named or lines or [type(error).__name__])[0]


def load_plain_state(
    path: str | Path, error: type[UsageError] = CheckpointError, map_location=None
):
    """``torch.load(path, weights_only=True)``; a missing, corrupt or code-carrying file
    raises ``error`` with one line naming ``path``."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path} not found; the checkpoint is incomplete")
    try:
        with warnings.catch_warnings():
            # A file written by pickle itself: the refusal below says what matters.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, weights_only=True, map_location=map_location)
    except pickle.UnpicklingError as e:
        raise error(
            f"{path} holds more than tensors and plain data ({_reason(e)}); refused, since "
            "loading it could run code"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise error(f"{path} is not a readable torch file ({_reason(e)})") from None
