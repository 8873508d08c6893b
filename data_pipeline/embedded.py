"""The embedded default corpus: a fixed set of standard-library sources every CPython install has.

``python -m k2train.train`` with no arguments trains on this, with the 4,096-token BPE shipped in
``assets/`` (trained on the same corpus by ``train_tokenizer``), so a fresh machine without
network can run. The module list is fixed and sorted; each file is split into documents at
top-level ``def``/``class`` statements. The text differs a little between Python versions, so
the tokenized cache is keyed by a hash of the actual text and the tokenizer.
"""

from __future__ import annotations

import hashlib
import os
import re
import sysconfig
from functools import lru_cache
from pathlib import Path

from .indexed import IndexedDataset, IndexedDatasetWriter, token_dtype
from .tokenizer import K2Tokenizer

ASSETS_DIR = Path(__file__).parent / "assets"
CACHE_FORMAT = 1

# Modules present and pure Python from 3.10 to 3.13 (none is scheduled for removal), ~3 MB of text.
EMBEDDED_MODULES = tuple(
    sorted(
        """abc argparse ast base64 bdb bisect calendar cmd code codecs codeop colorsys compileall
        configparser contextlib copy copyreg csv dataclasses datetime difflib dis enum filecmp
        fileinput fnmatch fractions ftplib functools getopt getpass gettext glob gzip hashlib heapq
        hmac imaplib inspect io ipaddress keyword linecache locale lzma mimetypes modulefinder
        netrc numbers opcode operator optparse os pathlib pdb pickle pkgutil platform plistlib
        poplib pprint profile pstats pty py_compile pyclbr queue quopri random reprlib rlcompleter
        runpy sched secrets selectors shelve shlex shutil signal site smtplib socket socketserver
        ssl stat statistics string stringprep struct subprocess symtable tabnanny tempfile textwrap
        threading timeit token tokenize trace traceback tracemalloc tty types uuid warnings wave
        weakref webbrowser zipapp zipimport json/__init__ json/decoder json/encoder
        collections/__init__ email/message email/utils email/feedparser http/client http/server
        urllib/parse urllib/request unittest/case asyncio/base_events asyncio/tasks
        asyncio/streams concurrent/futures/_base xml/dom/minidom importlib/__init__""".split()
    )
)

_TOP_LEVEL_DEF = re.compile(r"\n(?=(?:def |class |async def |@))")


def embedded_files() -> list[Path]:
    """The corpus files of this install, in a fixed order (missing modules are skipped)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paths = [stdlib / f"{m}.py" for m in EMBEDDED_MODULES]
    found = [p for p in paths if p.is_file()]
    if len(found) < len(paths) // 2:
        raise FileNotFoundError(
            f"the embedded corpus needs the standard-library sources under {stdlib}; found {len(found)} of {len(paths)}"
        )
    return found


@lru_cache(maxsize=1)
def embedded_documents() -> tuple[str, ...]:
    """The documents of the embedded corpus: top-level blocks of each module, empty ones dropped.

    Decorated definitions stay with their decorators: a split happens before ``@``/``def``/``class``
    only when the previous line is not itself a decorator.
    """
    docs: list[str] = []
    for path in embedded_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        parts = _TOP_LEVEL_DEF.split(text)
        merged: list[str] = []
        for part in parts:
            if merged and merged[-1].rstrip("\n").rsplit("\n", 1)[-1].startswith("@"):
                merged[-1] += "\n" + part
            else:
                merged.append(part)
        docs.extend(p for p in merged if p.strip())
    return tuple(docs)


def embedded_tokenizer() -> K2Tokenizer:
    """The shipped 4,096-token BPE (n_vocab 4,352; bos 4096, eos 4097)."""
    return K2Tokenizer(ASSETS_DIR)


def corpus_hash(docs: tuple[str, ...], tokenizer: K2Tokenizer) -> str:
    h = hashlib.sha256(f"k2train-embedded-v{CACHE_FORMAT}:{tokenizer.fingerprint}".encode())
    for d in docs:
        h.update(hashlib.sha256(d.encode("utf-8", errors="surrogatepass")).digest())
    return h.hexdigest()[:16]


def build_embedded_dataset(cache_dir: str | os.PathLike, tokenizer: K2Tokenizer | None = None) -> IndexedDataset:
    """Tokenize the embedded corpus (EOS after each document) into a cached indexed dataset.

    The cache file name holds a hash of the text and the tokenizer, so a new Python version or
    tokenizer builds a new cache; the writer renames its files into place, so concurrent ranks
    building the same cache at once both end up with a complete pair.
    """
    tokenizer = tokenizer or embedded_tokenizer()
    docs = embedded_documents()
    prefix = Path(cache_dir).expanduser() / f"embedded-{corpus_hash(docs, tokenizer)}"
    try:
        return IndexedDataset(prefix)
    except (FileNotFoundError, ValueError):
        pass
    writer = IndexedDatasetWriter(prefix, token_dtype(tokenizer.n_vocab))
    batch = 256
    for s in range(0, len(docs), batch):
        for ids in tokenizer.encode_batch(docs[s : s + batch], eos=True, num_threads=os.cpu_count() or 1):
            writer.add_document(ids)
    writer.finalize()
    return IndexedDataset(prefix)
