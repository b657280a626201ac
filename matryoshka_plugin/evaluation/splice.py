"""The coder spliced into a Hugging Face causal LM: what its reconstruction costs the model.

``spliced`` swaps a hookpoint module's output for the coder's for the span of one
``with`` block (the hook goes away afterwards); ``spliced_lm_metrics`` measures
cross-entropy, loss recovered and KL divergence at each prefix length with it.
"""

from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.errors import UsageError
from .prefix_metrics import prefix_lens_to_evaluate, reconstruct


def _hook_module(model, hookpoint: str):
    base = getattr(model, "base_model", model)
    try:
        return base.get_submodule(hookpoint)
    except AttributeError:
        names = [n for n, _ in base.named_modules() if n][:8]
        raise UsageError(
            f"hookpoint {hookpoint!r} is not a submodule of the model "
            f"(names look like: {', '.join(names)}, ...)"
        ) from None


@contextmanager
def spliced(
    model, coder, hookpoint: str, prefix_len: int | None = None, *, ablate=False, first_position: int = 0
):
    """Replace the hookpoint module's output by the coder's (or by zeros if ``ablate``).

    A transcoder reads the module's input, an autoencoder its output. Sequence
    outputs that are tuples get their first element replaced. Positions before
    ``first_position`` keep the module's own output: a coder trained without position
    0 (activation caches skip that outlier) is then neither tested nor ablated there.
    """
    module = _hook_module(model, hookpoint)

    def hook(mod, args, output):
        out = output[0] if isinstance(output, tuple) else output
        if ablate:
            new = torch.zeros_like(out)
        else:
            src = args[0] if coder.cfg.transcode else out
            flat = src.reshape(-1, src.shape[-1]).to(coder.dtype)
            new = reconstruct(coder, flat, prefix_len).view_as(out).to(out.dtype)
        if first_position:
            new = torch.cat([out[:, :first_position], new[:, first_position:]], dim=1)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _next_token_ce(logits: Tensor, ids: Tensor) -> Tensor:
    """Summed cross-entropy of predicting each token from the ones before it."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum"
    )


@torch.no_grad()
def spliced_lm_metrics(
    model,
    coder,
    hookpoint: str,
    token_batches: Iterable[Tensor],
    prefix_lens: Sequence[int] | None = None,
    *,
    first_position: int = 0,
) -> dict:
    """Next-token CE, loss recovered and KL(clean || spliced) at each prefix length.

    Loss recovered is ``(ce_ablated - ce_spliced) / (ce_ablated - ce_clean)``, with the
    hookpoint's output zero-ablated as the reference. KL is averaged over predicted
    positions. ``token_batches`` are ``[batch, seq]`` token-id tensors without padding.
    Splicing and ablation start at ``first_position`` (see ``spliced``).
    """
    lens = prefix_lens_to_evaluate(coder, prefix_lens)
    sums = {"clean": 0.0, "ablated": 0.0}
    ce = dict.fromkeys(lens, 0.0)
    kl = dict.fromkeys(lens, 0.0)
    n_tokens = 0
    device = next(model.parameters()).device
    for ids in token_batches:
        ids = torch.as_tensor(ids, dtype=torch.long, device=device)
        if ids.ndim != 2 or ids.shape[1] < 2:
            raise UsageError(f"token batches must be [batch, seq >= 2], got {tuple(ids.shape)}")
        clean = model(ids).logits
        clean_logp = clean[:, :-1].float().log_softmax(-1)
        sums["clean"] += float(_next_token_ce(clean, ids))
        with spliced(model, coder, hookpoint, ablate=True, first_position=first_position):
            sums["ablated"] += float(_next_token_ce(model(ids).logits, ids))
        for p in lens:
            with spliced(model, coder, hookpoint, p, first_position=first_position):
                logits = model(ids).logits
            ce[p] += float(_next_token_ce(logits, ids))
            logp = logits[:, :-1].float().log_softmax(-1)
            kl[p] += float(F.kl_div(logp, clean_logp, log_target=True, reduction="sum"))
        n_tokens += ids.shape[0] * (ids.shape[1] - 1)
    if n_tokens == 0:
        raise UsageError("token_batches is empty")
    ce_clean, ce_ablated = sums["clean"] / n_tokens, sums["ablated"] / n_tokens
    gap = ce_ablated - ce_clean
    rows = []
    for p in lens:
        ce_p = ce[p] / n_tokens
        rows.append({
            "prefix_len": p,
            "ce": ce_p,
            "kl": kl[p] / n_tokens,
            "loss_recovered": (ce_ablated - ce_p) / gap if gap != 0 else float("nan"),
        })
    return {"ce_clean": ce_clean, "ce_zero_ablated": ce_ablated, "n_tokens": n_tokens, "prefix": rows}
