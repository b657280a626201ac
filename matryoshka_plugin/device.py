"""The torch device a ``--device`` flag names, checked before any work starts."""

import torch

from .core.errors import UsageError


def resolve_device(name: str) -> torch.device:
    """The device ``--device`` names: ``auto`` is CUDA when available, else CPU.

    A name torch does not know, or CUDA on a machine without it, is a ``UsageError``
    (one line, exit 2) here, not a traceback from the first tensor moved there.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; allowed: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; use cpu or auto")
    return device
