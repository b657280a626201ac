"""``sparsify-matryoshka``: sparsify's CLI with Matryoshka options, config files and CPU.

It accepts every ``sparsify`` flag (it parses sparsify's own ``RunConfig``, with the
``sae`` section widened to ``MatryoshkaSparseCoderConfig``) and adds:

- ``--config_path FILE``: a JSON or YAML ``TrainConfig``/``RunConfig``; flags override it.
- ``--device``: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
- MODEL may be a hub name, a local HF folder, a ``.gguf`` file or ``smollm2``;
  DATASET a hub name, a ``save_to_disk`` folder, a ``.bin`` memmap, or plain text files.

It also mends two upstream quirks: ``--resume`` reads ``{save_dir}/{run_name}`` (upstream
reads ``checkpoints/{run_name}``), and a saved ``config.json`` holding both ``layers``
and ``hookpoints`` (upstream's own output) is accepted.
"""

import argparse
import json
import sys
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

import torch
import yaml
from datasets import Dataset, DatasetDict, load_dataset
from safetensors.torch import load_model
from simple_parsing import ArgumentParser
from sparsify.__main__ import RunConfig
from sparsify.data import MemmapDataset, chunk_and_tokenize
from sparsify.utils import simple_parse_args_string

from ..atomic import recover_dir
from ..core import MatryoshkaConfigError
from ..offline import OfflineAssetError, resolve_model
from .sparsify import CheckpointError, MatryoshkaSparseCoderConfig, MatryoshkaTrainer
from ..core.errors import UsageError

PROG = "sparsify-matryoshka"



@dataclass
class MatryoshkaRunConfig(RunConfig):
    sae: MatryoshkaSparseCoderConfig = field(default_factory=MatryoshkaSparseCoderConfig)
    """Sparse coder options, sparsify's plus the Matryoshka ones."""

    device: str = "auto"
    """Device to train on: auto (CUDA when available, else CPU), cpu, cuda or cuda:N."""


def config_problems(cls, data: dict, path: str = "") -> list[str]:
    """Unknown keys and out-of-choice ``Literal`` values in a config dict, recursively.

    Flags are checked by argparse; values read from a file are checked here, so the
    message names the field.
    """
    by_name = {f.name for f in fields(cls)}
    hints = typing.get_type_hints(cls)
    problems = []
    for key, value in data.items():
        hint = hints.get(key)
        if key not in by_name:
            problems.append(f"unknown field {path}{key}")
        elif is_dataclass(hint) and isinstance(value, dict):
            problems += config_problems(hint, value, f"{path}{key}.")
        elif typing.get_origin(hint) is typing.Literal and value not in typing.get_args(hint):
            allowed = ", ".join(map(str, typing.get_args(hint)))
            problems.append(f"{path}{key}={value!r} is not allowed; allowed: {allowed}")
        elif (expected := _type_problem(hint, value)) is not None:
            problems.append(f"{path}{key}={value!r} is not allowed; expected {expected}")
    return problems


_SCALARS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _scalar_ok(tp, value) -> bool:
    # simple_parsing would turn 3 into True and "8" into 8 without a word; a config
    # file holds typed JSON/YAML values, so take them only as their own type.
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                float(value)
                return True
            except ValueError:
                return False
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_problem(hint, value) -> str | None:
    """What ``value`` should have been, if it does not fit a simple ``hint``; else None."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None or len(args) != 1:
            return None
        hint = args[0]
        args = list(typing.get_args(hint))
    if hint in _SCALARS:
        return None if _scalar_ok(hint, value) else _SCALARS[hint]
    if typing.get_origin(hint) is list and len(args) == 1 and args[0] in _SCALARS:
        ok = isinstance(value, list) and all(_scalar_ok(args[0], v) for v in value)
        return None if ok else f"a list of {_SCALARS[args[0]].removeprefix('a ').removeprefix('an ')}s"
    return None


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


def parse_args(argv: list[str] | None) -> MatryoshkaRunConfig:
    # simple_parsing's own --config_path swallows the positional MODEL and DATASET, so
    # the file is read here first and becomes the defaults that flags override.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config_path")
    known, _ = pre.parse_known_args(argv)
    defaults = read_config_file(known.config_path) if known.config_path else None

    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config_path",
        metavar="FILE",
        help="JSON or YAML training config; flags override its values",
    )
    parser.add_arguments(MatryoshkaRunConfig, dest="run", default=defaults)
    args = parser.parse_args(argv).run
    if args.layers and args.hookpoints:
        raise UsageError(
            f"--layers {args.layers} and --hookpoints {args.hookpoints} contradict each "
            "other; give one of them"
        )
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; allowed: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; use cpu or auto")
    return device


def load_language_model(args: MatryoshkaRunConfig, device: torch.device):
    from transformers import AutoModel, AutoModelForCausalLM, BitsAndBytesConfig

    if args.load_in_8bit and device.type != "cuda":
        raise UsageError("--load_in_8bit true needs a CUDA device")
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    dtype = torch.float16 if args.load_in_8bit else torch.bfloat16 if cuda_bf16 else torch.float32
    # End-to-end losses need the LM head.
    cls = AutoModel if args.loss_fn == "fvu" else AutoModelForCausalLM
    return cls.from_pretrained(
        resolve_model(args.model),
        device_map={"": str(device)},
        quantization_config=(
            BitsAndBytesConfig(load_in_8bit=True) if args.load_in_8bit else None
        ),
        revision=args.revision,
        dtype=dtype,
        token=args.hf_token,
    )


def text_files(path: Path) -> list[Path]:
    files = [path] if path.is_file() else sorted(path.glob("*.txt"))
    if not files:
        raise UsageError(f"dataset folder {path} holds no .txt files")
    return files


def load_data(args: MatryoshkaRunConfig):
    """The training set, from any of the DATASET forms the CLI accepts."""
    if args.dataset.endswith(".bin"):
        return MemmapDataset(args.dataset, args.ctx_len, args.max_examples)
    path = Path(args.dataset).expanduser()
    if path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json")):
        dataset = Dataset.load_from_disk(str(path))
        if isinstance(dataset, DatasetDict):
            if args.split not in dataset:
                raise UsageError(f"--split {args.split!r} not in {path}; it has {list(dataset)}")
            dataset = dataset[args.split]
    elif path.exists():
        texts = [f.read_text(errors="replace") for f in text_files(path)]
        dataset = Dataset.from_dict({args.text_column: texts})
    elif args.dataset.startswith((".", "/", "~")):
        raise UsageError(f"dataset {args.dataset!r} does not exist")
    else:  # a hub name, for users who are online
        kwargs = simple_parse_args_string(args.data_args)
        dataset = load_dataset(args.dataset, split=args.split, **kwargs)

    if "input_ids" not in dataset.column_names:
        if args.text_column not in dataset.column_names:
            raise UsageError(
                f"--text_column {args.text_column!r} not in the dataset's columns "
                f"{dataset.column_names}"
            )
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model), token=args.hf_token)
        dataset = chunk_and_tokenize(
            dataset,
            tokenizer,
            max_seq_len=args.ctx_len,
            num_proc=max(args.data_preprocessing_num_proc, 1),
            text_key=args.text_column,
        )
    if len(dataset) < args.batch_size:
        raise UsageError(
            f"dataset {args.dataset!r} gives {len(dataset)} sequences of --ctx_len "
            f"{args.ctx_len} tokens, fewer than --batch_size {args.batch_size}"
        )
    dataset = dataset.shuffle(args.shuffle_seed).with_format("torch")
    if limit := args.max_examples:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset


def run(args: MatryoshkaRunConfig) -> None:
    device = resolve_device(args.device)
    run_dir = Path(args.save_dir) / (args.run_name or "unnamed")
    if args.resume:
        recover_dir(run_dir)  # a crash mid checkpoint swap leaves it under a sibling name
    if args.resume and not (run_dir / "state.pt").is_file():
        raise UsageError(f"--resume: no checkpoint to resume at {run_dir}")
    if args.finetune and not Path(args.finetune).is_dir():
        raise UsageError(f"--finetune {args.finetune}: no such checkpoint folder")

    model = load_language_model(args, device)
    dataset = load_data(args)
    print(f"Training on {args.dataset!r} on {device}; Matryoshka: {args.sae.matryoshka}")
    trainer = MatryoshkaTrainer(args, dataset, model)
    if args.resume:
        trainer.load_state(str(run_dir))
    elif args.finetune:
        for name, sae in trainer.saes.items():
            weights = Path(args.finetune) / name / "sae.safetensors"
            if not weights.is_file():
                raise UsageError(f"--finetune: {weights} not found")
            load_model(sae, str(weights), device=str(device))
    trainer.fit()


USER_ERRORS = (UsageError, MatryoshkaConfigError, CheckpointError, OfflineAssetError)


def main(argv: list[str] | None = None) -> None:
    try:
        run(parse_args(argv))
    except USER_ERRORS as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
