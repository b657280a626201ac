"""One ``sparsify-matryoshka`` training run: sparsify's own CLI flow with the plugin's pieces.

``train`` runs upstream's ``sparsify.__main__.run`` itself, so a run under ``torchrun``
goes as upstream's does: rank 0 preparing the data before the other ranks, the dataset
sharded per rank, each coder wrapped in DDP or, with ``--distribute_modules``, each
hookpoint's coders on one rank (in sparsify's ``Trainer``), and only rank 0 printing.
For the span of that one call these of its names are swapped, as they must differ for
the plugin:

- ``parse``: the config is already parsed, with ``--config_path`` and the Matryoshka
  options (``cli.sparsify``).
- ``load_artifacts``: upstream's puts the model on ``cuda:{rank}`` and reads a hub
  dataset or a ``save_to_disk`` folder; the plugin's runs on ``--device`` (CPU too),
  resolves offline models (a ``.gguf`` file, ``smollm2``; see ``offline``) and also
  reads plain text files, a split of a saved ``DatasetDict`` and ``.bin`` memmaps.
- ``Trainer``: ``MatryoshkaTrainer``, resuming from ``{save_dir}/{run_name}`` (upstream
  reads ``checkpoints/{run_name}`` whatever ``--save_dir`` says); under DDP it averages
  the BatchTopK thresholds over the ranks after every optimiser step.
- ``dist``, ``torch`` (as ``run`` sees them): upstream calls ``torch.cuda.set_device``
  and ``init_process_group("nccl")``, which fail on a CPU. The group is joined before
  ``run`` (``matryoshka_plugin.distributed``: gloo on CPU, NCCL on CUDA, with a
  timeout), and ``run`` sees those two calls as no-ops. Its one ``barrier`` (the other
  ranks waiting for rank 0 to prepare the data) waits as long as upstream's week-long
  group timeout allows, on a gloo group, while every other collective keeps the
  timeout that makes a dead rank end the others.
- ``os`` (as ``run`` sees it): ``run`` takes ``LOCAL_RANK`` for the rank, so on
  ``--nnodes 2`` every node's first rank would take the same data shard; it sees the
  global ``RANK`` there instead (and the model still goes on the local GPU).
- ``sparsify.trainer.DDP``: upstream passes the global rank as the CUDA device, which
  is wrong on a CPU (no device ids allowed) and on the second node of ``--nnodes``;
  the coder's own device is passed instead.
"""

import os
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from unittest.mock import patch

import sparsify.__main__ as upstream_cli
import sparsify.trainer
import torch
import torch.distributed as dist
from datasets import Dataset, DatasetDict, load_dataset
from sparsify.data import MemmapDataset
from sparsify.utils import simple_parse_args_string
from torch.nn.parallel import DistributedDataParallel

from ... import distributed
from ...atomic import check_writable_dir, recover_dir, run_lock
from ...core.errors import UsageError
from ...device import resolve_device
from ...offline import resolve_model
from .coder import MatryoshkaSparseCoder
from .run_config import MatryoshkaRunConfig, check_memmap_file, chunk_and_tokenize_checked
from .trainer import MatryoshkaTrainer

PREPARATION_TIMEOUT = timedelta(weeks=1)
"""How long the other ranks wait for rank 0 to prepare the data (upstream's timeout)."""


def load_language_model(args: MatryoshkaRunConfig, device: torch.device):
    """The model to hook, on ``device``: bf16 on a CUDA device that has it, else fp32."""
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
    """A text file, or a folder's ``*.txt`` files in name order: one document each."""
    files = [path] if path.is_file() else sorted(path.glob("*.txt"))
    if not files:
        raise UsageError(f"dataset folder {path} holds no .txt files")
    return files


def load_data(args: MatryoshkaRunConfig):
    """The training set, from any of the DATASET forms the CLI accepts."""
    if args.dataset.endswith(".bin"):
        check_memmap_file(args.dataset, args.ctx_len)
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
        dataset = chunk_and_tokenize_checked(
            dataset,
            tokenizer,
            source=args.dataset,
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


class _Overlay:
    """``module`` as upstream's ``run`` sees it: ``overrides`` first, the rest as is."""

    def __init__(self, module, **overrides):
        self._module = module
        vars(self).update(overrides)

    def __getattr__(self, name):
        return getattr(self._module, name)


def _already_done(*_args, **_kwargs) -> None:
    """Stands in for upstream's ``set_device``/``init_process_group`` (ours ran first)
    and for the ``torch.device(rank)`` it passes them, which fails without a GPU."""


def _upstream_distributed_names() -> dict:
    """The ``dist`` and ``torch`` names upstream's ``run`` sees in a process group."""
    if not dist.is_initialized():
        return {}
    # monitored_barrier is gloo's; under NCCL the preparation wait gets a gloo group.
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def preparation_barrier() -> None:
        dist.monitored_barrier(group=group, timeout=PREPARATION_TIMEOUT)

    global_rank = {**os.environ, "LOCAL_RANK": str(dist.get_rank())}
    return {
        "os": _Overlay(os, environ=global_rank),
        "dist": _Overlay(dist, init_process_group=_already_done, barrier=preparation_barrier),
        "torch": _Overlay(
            torch, device=_already_done, cuda=_Overlay(torch.cuda, set_device=_already_done)
        ),
    }


def _ddp(module, device_ids=None) -> DistributedDataParallel:
    """Upstream's DDP wrapping, with the coder's own device instead of the global rank."""
    ids = [module.device.index] if module.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def average_batch_topk_thresholds(trainer: MatryoshkaTrainer) -> None:
    """Under DDP, set every rank's BatchTopK thresholds to their mean after each step.

    Each rank updates its threshold from its own batch; without this the saved value
    would be rank 0's alone and a resume would start the other ranks from it.
    """
    coders = [
        c for c in trainer.saes.values()
        if isinstance(c, MatryoshkaSparseCoder) and c.cfg.batch_topk
    ]
    if not coders or not dist.is_initialized() or trainer.cfg.distribute_modules:
        return

    @torch.no_grad()
    def average(*_):
        thresholds = torch.stack([c.batch_topk_threshold for c in coders])
        dist.all_reduce(thresholds)
        thresholds /= dist.get_world_size()
        for coder, t in zip(coders, thresholds):
            coder.batch_topk_threshold.copy_(t)

    first = trainer.optimizers[0]
    getattr(first, "base", first).register_step_post_hook(average)


def train(args: MatryoshkaRunConfig, dist_timeout_s: float = distributed.DEFAULT_TIMEOUT_S) -> None:
    """Train as ``sparsify`` does on ``args``; a user's mistake raises ``UsageError``.

    The checks that need no model come first, so a bad flag costs no model load. Under
    ``torchrun`` every collective waits at most ``dist_timeout_s`` for the other ranks.
    """
    device = resolve_device(args.device)
    run_dir = Path(args.save_dir) / (args.run_name or "unnamed")
    if args.resume:
        recover_dir(run_dir)  # a crash mid checkpoint swap leaves it under a sibling name
    if args.resume and not (run_dir / "state.pt").is_file():
        raise UsageError(f"--resume: no checkpoint to resume at {run_dir}")
    if args.finetune and not Path(args.finetune).is_dir():
        raise UsageError(f"--finetune {args.finetune}: no such checkpoint folder")
    check_writable_dir(run_dir)
    local_rank = distributed.join_process_group(device, dist_timeout_s) or 0

    def load_artifacts(run_args: MatryoshkaRunConfig, _global_rank: int):
        # As upstream does, local rank r's model goes on cuda:r (alone, 0); an explicit
        # cuda:N is kept.
        on_rank = device.type == "cuda" and device.index is None
        rank_device = torch.device("cuda", local_rank) if on_rank else device
        return load_language_model(run_args, rank_device), load_data(run_args)

    def build_trainer(cfg: MatryoshkaRunConfig, dataset, model) -> MatryoshkaTrainer:
        print(f"Device: {device}; Matryoshka: {cfg.sae.matryoshka}")
        trainer = MatryoshkaTrainer(cfg, dataset, model)
        if distributed.rank() == 0:
            # Held while fit() writes, once every input (resume files included) passed its
            # checks, so a refused run leaves no lock file. One holder refuses a second run.
            fit = trainer.fit

            def fit_locked():
                with run_lock(run_dir):
                    fit()

            trainer.fit = fit_locked
        average_batch_topk_thresholds(trainer)
        if cfg.resume:
            # Upstream then calls trainer.load_state("checkpoints/{run_name}").
            trainer.load_state = lambda _upstream_path: MatryoshkaTrainer.load_state(
                trainer, str(run_dir)
            )
        elif cfg.finetune:
            for name in trainer.saes:  # upstream loads these files next
                weights = Path(cfg.finetune) / name / "sae.safetensors"
                if not weights.is_file():
                    raise UsageError(f"--finetune: {weights} not found")
        return trainer

    with ExitStack() as scope:
        scope.enter_context(
            distributed.reporting_lost_ranks(f"rerun every rank with --resume to go on from {run_dir}")
        )
        scope.enter_context(patch.multiple(
            upstream_cli,
            parse=lambda _config_class: args,
            load_artifacts=load_artifacts,
            Trainer=build_trainer,
            **_upstream_distributed_names(),
        ))
        scope.enter_context(patch.object(sparsify.trainer, "DDP", _ddp))
        upstream_cli.run()
    distributed.leave_process_group()
