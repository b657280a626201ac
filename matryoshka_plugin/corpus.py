"""An offline text corpus: Jane Austen's six novels, as text or as sparsify's token chunks.

The novels come from the Debian package ``r-cran-janeaustenr`` (public-domain text,
MIT package), fetched with ``apt-get download`` (no install, so R is not pulled in).
The text sits in R lazy-load files, read here with the PyPI ``rdata`` package. The
extracted ``.txt`` copies are cached under ``asset_cache.cache_dir()``.

Held-out split: the ``test`` split is the last 10% of each novel (by characters, cut at
a paragraph break); ``train`` is the first 90%. No text is shared between them.
"""

import gzip
import os
import shutil
import struct
import subprocess
import tempfile
import warnings
import zlib
from collections.abc import Iterable
from pathlib import Path

import torch

from .asset_cache import cache_dir
from .atomic import atomic_dir, atomic_write_text
from .core.errors import OfflineAssetError, UsageError

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
    # Unpacked whole before it replaces the cached copy: a failed or interrupted
    # extraction leaves the previous one (or none), never half a package.
    with (
        tempfile.TemporaryDirectory() as download,
        atomic_dir(root, error=OfflineAssetError) as unpacked,
    ):
        deb_path = Path(deb) if deb is not None else _download_deb(Path(download))
        if not deb_path.is_file():
            raise OfflineAssetError(f"Debian package {deb_path} does not exist")
        result = subprocess.run(
            ["dpkg-deb", "-x", str(deb_path), str(unpacked)], capture_output=True, text=True
        )
        if result.returncode != 0 or not (unpacked / _RDATA_SUBDIR / "Rdata.rdx").is_file():
            raise OfflineAssetError(
                f"{deb_path} is not a {AUSTEN_DEB} package with {_RDATA_SUBDIR}/Rdata.rdx "
                f"({result.stderr.strip() or 'file missing'})"
            )
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


def austen_texts_dir() -> Path:
    """Where the novels' cached ``.txt`` copies live."""
    return cache_dir() / "austen"


def write_texts(texts: dict[str, str], out_dir: str | Path) -> list[Path]:
    """Write each text as ``<name>.txt`` in ``out_dir`` (atomically, file by file)."""
    paths = [Path(out_dir) / f"{name}.txt" for name in texts]
    for path, text in zip(paths, texts.values()):
        atomic_write_text(path, text)
    return paths


def austen_texts(deb: str | Path | None = None) -> dict[str, str]:
    """Jane Austen's six novels, ``{name: text}`` in publication order (see ``AUSTEN_NOVELS``).

    Reads the cached ``.txt`` copies when present; otherwise extracts them from the Debian
    package (downloaded with ``apt-get download`` unless ``deb`` is given) and caches them.
    """
    cached = austen_texts_dir()
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
        raise UsageError(f"split={split!r} is unknown; allowed: {', '.join(SPLITS)}")
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
        raise UsageError(f"ctx_len={ctx_len} must be at least 2 tokens")
    if split not in SPLITS:
        raise UsageError(f"split={split!r} is unknown; allowed: {', '.join(SPLITS)}")
    unknown = [n for n in novels or [] if n not in AUSTEN_NOVELS]
    if unknown or novels == []:
        raise UsageError(
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


def corpus_chunks(tokenizer, texts: Iterable[str], n_tokens: int, seq_len: int) -> list[torch.Tensor]:
    """Token-id chunks of ``seq_len`` (BOS first, as circuit-tracer prompts) covering ``n_tokens``."""
    bos = tokenizer.bos_token_id
    body = seq_len - (1 if bos is not None else 0)
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= n_tokens:
            break
    ids = ids[:n_tokens]
    if len(ids) < body:
        raise UsageError(f"the corpus has {len(ids)} tokens; at least {body} are needed")
    chunks = []
    for start in range(0, len(ids) - body + 1, body):
        part = ids[start : start + body]
        chunks.append(torch.tensor(([bos] if bos is not None else []) + part))
    return chunks
