"""Model hooks: which modules are a Hugging Face decoder's MLPs, and what they read and write.

- ``hookpoint_layer``: the layer number of an MLP hookpoint name (``layers.3.mlp``,
  ``model.layers.3.mlp``, GPT-2's ``h.3.mlp``), as sparsify names its hookpoints.
- ``parse_layers``: a ``--layers`` value (``"0,1,2"``, ``"0-3"``) as sorted layer numbers;
  ``format_layers`` the other way, for messages (``[3, 4, 5, 9]`` -> ``3-5, 9``).
- ``mlp_modules``: ``{layer: (hookpoint, module)}`` of every MLP in a model.
- ``capture_mlps``: forward hooks on chosen layers' MLPs for the span of a ``with``
  block; each forward run through it returns those MLPs' inputs (and outputs), and can
  stop once the last needed layer has been seen.

The CLT activation cache, the global graph's statistics pass and the demo's held-out
activations all read MLPs through ``capture_mlps``. A bad layer list or a model without
recognisable MLPs raises ``CLTError`` (a ``UsageError``), as the CLT cache always has.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

from torch import Tensor, nn

from .core.errors import CLTError, ExportError

_MLP_HOOKPOINT = re.compile(r"^(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)\.mlp$")


def hookpoint_layer(hookpoint: str) -> int:
    """Layer index of a sparsify MLP hookpoint (``layers.3.mlp``, ``model.layers.3.mlp``)."""
    m = _MLP_HOOKPOINT.match(hookpoint)
    if m is None:
        raise ExportError(
            f"hookpoint {hookpoint!r} is not an MLP hookpoint; allowed: layers.N.mlp, "
            "model.layers.N.mlp (transcoders replace MLPs in circuit-tracer)"
        )
    return int(m.group(1))


def parse_layers(spec: str | list[int]) -> list[int]:
    """``"0,1,2"``, ``"0-3"`` or a list -> sorted layer numbers, rejecting duplicates."""
    if isinstance(spec, list):
        layers = [int(i) for i in spec]
    else:
        layers = []
        try:
            for part in str(spec).split(","):
                part = part.strip()
                if "-" in part:
                    lo, hi = part.split("-")
                    layers.extend(range(int(lo), int(hi) + 1))
                elif part:
                    layers.append(int(part))
        except ValueError:
            raise CLTError(
                f"layers {spec!r} is not a layer list; allowed: e.g. 0,1,2 or 0-3"
            ) from None
    if not layers or len(set(layers)) != len(layers) or min(layers) < 0:
        raise CLTError(f"layers {spec!r} must be distinct non-negative layer numbers")
    return sorted(layers)


def format_layers(layers: list[int]) -> str:
    """``[3, 4, 5, 9]`` -> ``3-5, 9``: a long run of layer numbers on one short line."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def mlp_modules(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """``{layer: (hookpoint, mlp module)}`` of a Hugging Face decoder (Llama, GPT-2, NeoX...)."""
    found = {}
    for name, module in model.named_modules():
        try:
            layer = hookpoint_layer(name)
        except ExportError:
            continue
        found[layer] = (name, module)
    if not found:
        raise CLTError(f"found no MLP modules named like layers.N.mlp in {type(model).__name__}")
    return found


class MLPActivations(NamedTuple):
    """What one layer's MLP read and wrote in one forward pass, ``[batch, seq, d_model]``."""

    input: Tensor
    output: Tensor | None
    """None when the capture was asked for inputs only."""


class _StopForward(Exception):
    """Raised by the last needed layer's hook: the layers after it are not run."""


@contextmanager
def capture_mlps(
    model: nn.Module,
    layers: Sequence[int],
    *,
    outputs: bool = True,
    stop: bool = True,
) -> Iterator[Callable[[Tensor], dict[int, MLPActivations]]]:
    """Hooks on the MLPs of ``layers`` for the span of the block; yields ``run(input_ids)``.

    ``run`` moves ``input_ids`` to the model's device, runs one forward pass and returns
    ``{layer: MLPActivations}`` for it: the tensors the model passed to and got from each
    MLP (Hugging Face decoders add the MLP output to the residual out of place, so they
    are not changed afterwards). With ``stop`` the forward ends at the last layer, after
    its MLP output (``outputs=True``) or before its MLP runs (inputs only); the model's
    own output is then never computed, so ``run`` returns only the captures.

    Every layer must be in ``mlp_modules(model)``; callers check that with their own message.
    """
    mlps = mlp_modules(model)
    last = max(layers)
    ins: dict[int, Tensor] = {}
    outs: dict[int, Tensor] = {}

    def pre_hook(layer):
        def hook(module, args, kwargs):
            ins[layer] = args[0] if args else next(iter(kwargs.values()))
            if stop and not outputs and layer == last:
                raise _StopForward

        return hook

    def post_hook(layer):
        def hook(module, args, kwargs, output):
            outs[layer] = output[0] if isinstance(output, tuple) else output
            if stop and layer == last:
                raise _StopForward

        return hook

    handles = []
    for layer in layers:
        module = mlps[layer][1]
        handles.append(module.register_forward_pre_hook(pre_hook(layer), with_kwargs=True))
        if outputs:
            handles.append(module.register_forward_hook(post_hook(layer), with_kwargs=True))
    device = next(model.parameters()).device

    def run(input_ids: Tensor) -> dict[int, MLPActivations]:
        ins.clear()
        outs.clear()
        try:
            model(input_ids=input_ids.to(device))
        except _StopForward:
            pass
        return {layer: MLPActivations(ins[layer], outs.get(layer)) for layer in layers}

    try:
        yield run
    finally:
        for h in handles:
            h.remove()
