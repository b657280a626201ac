"""The options of ``sparsify-matryoshka``, and the strict reading of its config files.

``MatryoshkaRunConfig`` is sparsify's own CLI config (``sparsify.__main__.RunConfig``)
with the ``sae`` section widened to ``MatryoshkaSparseCoderConfig`` and a ``device``
option. ``read_config_file`` reads a JSON or YAML file of it, refusing unknown fields
and ill-typed values by name (simple_parsing would coerce or drop them silently).
"""

import argparse
import json
import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import yaml
from safetensors import SafetensorError, safe_open
from sparsify.__main__ import RunConfig
from sparsify.data import chunk_and_tokenize

from ...core import MatryoshkaConfigError
from ...core.errors import CheckpointError, UsageError
from ...core.field_types import config_problems
from .coder import MatryoshkaSparseCoderConfig


def _integer_problem(name: str, value, low: int) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= low:
        return None
    return f"{name}={value!r} is not allowed; expected an integer >= {low}"


def _number_problem(name: str, value, *, positive: bool) -> str | None:
    # NaN passes every comparison upstream makes: lr=nan trains to NaN weights, exit 0.
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and math.isfinite(value) and (value > 0 if positive else value >= 0):
        return None
    return f"{name}={value!r} is not allowed; expected a finite number {'>' if positive else '>='} 0"


# TrainConfig fields that upstream takes at face value: 0 or less trains nothing,
# divides by zero, or never saves.
_AT_LEAST = {
    "batch_size": 1, "grad_acc_steps": 1, "micro_acc_steps": 1, "save_every": 1,
    "layer_stride": 1, "wandb_log_frequency": 1, "lr_warmup_steps": 0, "k_decay_steps": 0,
    "dead_feature_threshold": 0,
}
# RunConfig's; a field is checked only where the config has it.
_RUN_AT_LEAST = {"ctx_len": 1, "max_examples": 1}


def check_train_config(cfg) -> None:
    """Refuse a sparsify ``TrainConfig`` (or ``RunConfig``) that could only train badly.

    Called from the plugin's config classes' ``__post_init__``, so flags, config files
    and the Python API all get it. Upstream's own checks become one-line errors too.
    """
    bad = MatryoshkaConfigError
    if getattr(cfg.sae, "matryoshka", False) and cfg.loss_fn in ("ce", "kl"):
        raise bad(
            f"loss_fn={cfg.loss_fn!r} with matryoshka=true would train a plain coder: "
            f"sparsify back-propagates only the {cfg.loss_fn} loss through sae_out, never "
            "the nested loss; use loss_fn='fvu' (or matryoshka=false)"
        )
    limits = {**_AT_LEAST, **{k: v for k, v in _RUN_AT_LEAST.items() if hasattr(cfg, k)}}
    for name, low in limits.items():
        value = getattr(cfg, name)
        if name == "max_examples" and value is None:
            continue
        if problem := _integer_problem(name, value, low):
            raise bad(problem)
    if cfg.lr is not None and (problem := _number_problem("lr", cfg.lr, positive=True)):
        raise bad(f"{problem} (or unset: chosen from the width)")
    if problem := _number_problem("auxk_alpha", cfg.auxk_alpha, positive=False):
        raise bad(problem)
    if bad_layers := [i for i in cfg.layers if not isinstance(i, int) or i < 0]:
        raise bad(f"layers={cfg.layers} is not allowed: {bad_layers} are not layer indices (0 or more)")


def check_model_targets(cfg, model) -> None:
    """Refuse ``layers`` beyond the model and ``hookpoints`` patterns that match no module.

    Upstream skips a pattern that matches nothing without a word (and trains nothing if
    none match) and fails with a bare KeyError on a layer past the last one.
    """
    n_layers = model.config.num_hidden_layers if cfg.layers else 0  # hookpoint-only models may lack a config
    if beyond := [i for i in cfg.layers if i >= n_layers]:
        raise MatryoshkaConfigError(
            f"layers={cfg.layers}: {beyond} do not exist; the model has layers 0 to {n_layers - 1}"
        )
    names = [name for name, _ in model.base_model.named_modules() if name]
    if unmatched := [p for p in cfg.hookpoints if not any(fnmatchcase(n, p) for n in names)]:
        examples = ", ".join(names[:4])
        raise MatryoshkaConfigError(
            f"hookpoints {unmatched} match no module of the model (its modules are named "
            f"like {examples}, ...)"
        )


def check_dataset_length(cfg, dataset) -> None:
    """Refuse a dataset too short for one batch: upstream would train 0 steps and exit 0."""
    if len(dataset) < cfg.batch_size:
        raise UsageError(
            f"the dataset holds {len(dataset)} sequences, fewer than batch_size "
            f"{cfg.batch_size}: no training step would run"
        )


def check_weights_fit(saes: dict, directory: str | Path, what: str) -> None:
    """Refuse ``directory/<name>/sae.safetensors`` files that do not fit the coders ``saes``.

    Read from the safetensors headers alone: upstream's ``load_model`` would fail with a
    multi-line RuntimeError, after loading the rest of the checkpoint.
    """
    for name, sae in saes.items():
        weights = Path(directory) / name / "sae.safetensors"
        if not weights.is_file():
            raise CheckpointError(f"{what}: {weights} not found")
        try:
            with safe_open(str(weights), "pt") as f:
                shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{what}: {weights} is not a readable safetensors file ({e})") from None
        expected = {k: list(v.shape) for k, v in sae.state_dict().items()}
        if shapes != expected:
            diff = {k: (shapes.get(k), v) for k, v in expected.items() if shapes.get(k) != v}
            extra = sorted(set(shapes) - set(expected))
            raise CheckpointError(
                f"{what}: {weights} does not fit the coder {name!r}: (file, expected) shapes "
                f"{diff}{f', extra tensors {extra}' if extra else ''}"
            )


def chunk_and_tokenize_checked(dataset, tokenizer, *, source: str, **kwargs):
    """sparsify's ``chunk_and_tokenize``, a text too short for one sequence as one line.

    Upstream raises a bare ValueError from inside ``datasets.map`` for an empty text or
    one shorter than ``max_seq_len`` tokens.
    """
    try:
        return chunk_and_tokenize(dataset, tokenizer, **kwargs)
    except ValueError as e:
        if "Not enough data" not in str(e):
            raise
        raise UsageError(
            f"dataset {source} is too short: it does not fill one sequence of "
            f"{kwargs.get('max_seq_len')} tokens (--ctx_len)"
        ) from None


def check_memmap_file(path: str | Path, ctx_len: int) -> None:
    """Refuse a ``.bin`` token file that is missing or does not split into ``ctx_len`` rows.

    sparsify's ``MemmapDataset`` reads uint16 tokens and reshapes them to
    ``[-1, ctx_len]``, failing with a bare numpy error otherwise.
    """
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"dataset {path}: no such .bin token file")
    size = file.stat().st_size
    if size == 0 or size % (2 * ctx_len):
        raise UsageError(
            f"dataset {path} holds {size} bytes; a .bin token file holds uint16 tokens in "
            f"whole rows of --ctx_len {ctx_len} (a multiple of {2 * ctx_len} bytes, not 0)"
        )


@dataclass
class MatryoshkaRunConfig(RunConfig):
    sae: MatryoshkaSparseCoderConfig = field(default_factory=MatryoshkaSparseCoderConfig)
    """Sparse coder options, sparsify's plus the Matryoshka ones."""

    device: str = "auto"
    """Device to train on: auto (CUDA when available, else CPU), cpu, cuda or cuda:N."""

    def __post_init__(self):
        checked_post_init(super().__post_init__)
        check_train_config(self)


def checked_post_init(upstream_post_init) -> None:
    """Run upstream's ``TrainConfig.__post_init__``, its ValueErrors as one-line errors."""
    try:
        upstream_post_init()
    except ValueError as e:
        if isinstance(e, MatryoshkaConfigError):
            raise
        raise MatryoshkaConfigError(str(e)) from None


def read_config_file(path: str) -> MatryoshkaRunConfig:
    """A run config from a JSON or YAML file, strictly checked."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--config_path {path}: no such file")
    text = file.read_text()
    try:
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0]
        raise UsageError(f"--config_path {path} does not parse: {first}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config_path {path} must hold a mapping of config fields")
    if problems := config_problems(MatryoshkaRunConfig, data):
        raise UsageError(f"--config_path {path}: {'; '.join(problems)}")
    # sparsify's Trainer writes the hookpoints it derived from `layers` (already
    # strided) back into the config it saves; feeding that file back in would trip its
    # own assert, or stride the hookpoints a second time.
    if data.get("layers") and data.get("hookpoints"):
        data.pop("layers")
        data["layer_stride"] = 1
    try:
        return MatryoshkaRunConfig.from_dict(data)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        if isinstance(e, MatryoshkaConfigError):
            raise
        raise UsageError(f"--config_path {path}: {e}") from None
