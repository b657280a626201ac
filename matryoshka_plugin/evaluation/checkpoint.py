"""Evaluating a saved coder on held-out files: the work behind ``matryoshka-eval``.

The inputs are a coder directory (or a run directory holding one per hookpoint),
activations in safetensors (``inputs``, and ``targets`` for transcoders) and,
optionally, a local causal LM with token ids to splice the coder into.
"""

from pathlib import Path

import torch
from torch import Tensor

from ..core.errors import UsageError
from .report import evaluate
from .splice import spliced_lm_metrics


def resolve_coder_dir(path: Path, hookpoint: str | None) -> Path:
    """A coder directory (with cfg.json), from itself or from a run directory."""
    if not path.exists():
        raise UsageError(f"checkpoint {path} does not exist")
    if hookpoint is not None:
        path = path / hookpoint
        if not (path / "cfg.json").is_file():
            raise UsageError(f"{path} holds no cfg.json; is --hookpoint {hookpoint!r} right?")
        return path
    if (path / "cfg.json").is_file():
        return path
    found = sorted(p.parent for p in path.glob("*/cfg.json"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise UsageError(f"{path} holds no cfg.json, nor any <hookpoint>/cfg.json")
    names = ", ".join(p.name for p in found)
    raise UsageError(f"{path} holds several coders ({names}); pick one with --hookpoint")


def load_activations(path: Path, max_rows: int | None) -> tuple[Tensor, Tensor | None]:
    """``inputs`` (and ``targets`` if present) from a safetensors file, as float32."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise UsageError(f"cannot read --data {path}: {e}") from None
    if "inputs" not in tensors:
        raise UsageError(f"--data {path} has no 'inputs' tensor; it holds {sorted(tensors)}")
    x, y = tensors["inputs"].float(), tensors.get("targets")
    y = None if y is None else y.float()
    if max_rows is not None:
        x = x[:max_rows]
        y = None if y is None else y[:max_rows]
    return x, y


def load_token_batches(path: Path, batch_size: int) -> list[Tensor]:
    """``input_ids`` ``[sequences, length]`` from a safetensors file, in batches of sequences."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        ids = load_file(str(path)).get("input_ids")
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise UsageError(f"cannot read --tokens {path}: {e}") from None
    if ids is None or ids.ndim != 2:
        raise UsageError(f"--tokens {path} needs an 'input_ids' tensor of shape [sequences, length]")
    return list(ids.long().split(batch_size))


def evaluate_checkpoint(
    checkpoint: Path,
    data: Path,
    *,
    hookpoint: str | None = None,
    prefix_lens: list[int] | None = None,
    max_rows: int | None = None,
    rsa_samples: int = 1000,
    dense_threshold: float = 0.1,
    power_law_trim: float = 0.0,
    model: Path | None = None,
    tokens: Path | None = None,
    splice_hookpoint: str | None = None,
    splice_from_position: int = 0,
    lm_batch_size: int = 8,
    device: str = "cpu",
) -> dict:
    """The ``evaluate`` report of a saved coder, plus ``lm`` metrics if ``model`` is given.

    The coder is spliced at ``splice_hookpoint``, by default the coder directory's name
    (sparsify names each coder of a run after its hookpoint).
    """
    # Imported here, as the package root does, so that the metrics import whichever
    # sparsify is installed; only loading a checkpoint needs the sparsify adapter.
    from ..adapters.sparsify import load_coder

    coder_dir = resolve_coder_dir(checkpoint, hookpoint)
    coder = load_coder(coder_dir, device=device)
    if broken := [n for n, t in coder.state_dict().items() if not torch.isfinite(t).all()]:
        raise UsageError(
            f"coder {coder_dir} has NaN or Inf weights in {', '.join(broken)}; its training "
            "diverged, so no metric of it is meaningful"
        )
    x, y = load_activations(data, max_rows)
    for name, t in (("inputs", x), ("targets", y)):
        if t is not None and not torch.isfinite(t).all():
            raise UsageError(f"--data {data}: {name} hold NaN or Inf values; allowed: finite values only")
    x = x.to(device)
    y = None if y is None else y.to(device)
    if not coder.cfg.transcode:
        y = None  # an autoencoder reconstructs its input; ignore any 'targets'
    result = evaluate(
        coder, x, y, prefix_lens,
        rsa_samples=rsa_samples,
        dense_threshold=dense_threshold,
        power_law_trim=power_law_trim,
    )
    result["checkpoint"] = str(coder_dir)
    if model is not None:
        from transformers import AutoModelForCausalLM

        batches = load_token_batches(tokens, lm_batch_size)
        try:
            lm = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
        except OSError as e:
            raise UsageError(f"cannot load --model {model}: {e}".splitlines()[0]) from None
        lm = lm.to(device).eval()
        splice_at = splice_hookpoint or coder_dir.name
        result["lm"] = spliced_lm_metrics(
            lm, coder, splice_at, batches, prefix_lens, first_position=splice_from_position,
        )
        result["lm"]["hookpoint"] = splice_at
    return result
