"""The data a run trains on when no data flags are given: the Python standard library's source.

megazero ships no third-party text and cannot download any, but every machine that runs it has
the stdlib's ``*.py`` files (real, varied, permissively licensed code). So that a default run
trains on the same files on every machine, the corpus is a fixed list, `STDLIB_FILES`: the 460
modules (about 8.4 MB) that CPython 3.10, 3.11, 3.12 and 3.13 all have, both in python.org/pyenv
builds and in Debian's split packages (which leave out e.g. ``tkinter`` and ``turtledemo``), less
tests, ``idlelib``, ``lib2to3`` and the build-specific ``_sysconfigdata_*``. A file's content
still differs a little between Python versions; the list keeps everything else the same. The corpus:

* the listed files found under ``sysconfig.get_paths()["stdlib"]`` (missing or empty ones are
  skipped), sorted by relative path;
* if they add up to more than `max_bytes`, a deterministic subset spread evenly over that sorted
  list (error diffusion on file sizes), not just its alphabetical beginning;
* files that are not UTF-8 are skipped; the files are stored in the order of a salted sha256 of
  their relative path, files under 16,000 characters first: the contiguous train/valid/test
  document ranges of ``--split`` each sample the whole library, the small valid/test ranges at
  the end hold files large enough for a sample, and a file missing on one machine does not
  reshuffle the others (the valid and test files are the same everywhere);
* one document per file, except that a file of N >= 32,000 characters is cut at line ends into
  N // 16,000 consecutive documents of at least 16,000 characters (about 650 documents in all:
  ``--split 969,30,1`` needs more than 500 to give the test split one).

A tokenizer with `vocab_size` pieces is trained on it and the files are tokenized into an indexed
dataset, cached under ``<cache_dir>/stdlib-py<X.Y>-v<vocab>-<digest of the files>/`` so it is
built once per Python version, vocabulary and file list. torchrun ranks all call
`prepare_default_data` before any process group exists; an exclusive ``fcntl.flock`` on
``<key>.lock`` lets one build while the others wait and then reuse its result.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

from megazero.data.indexed_dataset import IndexedDataset, dataset_exists
from megazero.data.preprocess import write_dataset
from megazero.data.tokenizer import Tokenizer, train_tokenizer
from megazero.errors import DataError
from megazero.fileio import atomic_write_bytes

DEFAULT_MAX_BYTES = 12_000_000
# Part of the cache key: bump it when the way the corpus or tokenizer is built changes.
_RECIPE_VERSION = 3
_DOC_ORDER_SALT = "megazero-default-corpus-1234"
_TAIL_MIN_CHARS = 16_000

# The corpus files, relative to the stdlib folder: one folder per line ("" = the top level), then
# module names (".py" appended). Made from the ``*.py`` files that the stdlib of each of CPython
# 3.10.13, 3.11.7, 3.12.1, 3.13.0 (pyenv builds) and Debian 12's 3.11.2 has, outside ``test``,
# ``tests``, ``idlelib``, ``lib2to3``, ``site-packages`` and ``dist-packages``, less the
# build-specific ``_sysconfigdata_*``.
# Changing it changes every default-corpus number in README.md: bump _RECIPE_VERSION and re-measure.
_STDLIB_FILES = """
: __future__ _aix_support _collections_abc _compat_pickle _compression _markupbase _osx_support
: _py_abc _pyio _sitebuiltins _strptime _threading_local
: _weakrefset abc antigravity argparse ast base64 bdb bisect bz2 cProfile calendar cmd code codecs
: codeop colorsys compileall configparser contextlib contextvars copy copyreg csv dataclasses
: datetime decimal difflib dis doctest enum filecmp fileinput fnmatch fractions ftplib functools
: genericpath getopt getpass gettext glob graphlib gzip hashlib heapq hmac imaplib inspect io
: ipaddress keyword linecache locale lzma mailbox mimetypes modulefinder netrc ntpath nturl2path
: numbers opcode operator optparse os pdb pickle pickletools pkgutil platform plistlib poplib
: posixpath pprint profile pstats pty py_compile pyclbr pydoc queue quopri random reprlib
: rlcompleter runpy sched secrets selectors shelve shlex shutil signal site smtplib socket
: socketserver sre_compile sre_constants sre_parse ssl stat statistics string stringprep struct
: subprocess symtable tabnanny tarfile tempfile textwrap this threading timeit token tokenize trace
: traceback tracemalloc tty turtle types typing uuid warnings wave weakref webbrowser zipapp
: zipimport
asyncio: __init__ __main__ base_events base_futures base_subprocess base_tasks constants coroutines
asyncio: events exceptions format_helpers futures locks log mixins proactor_events protocols queues
asyncio: runners selector_events sslproto staggered streams subprocess tasks threads transports
asyncio: trsock unix_events windows_events windows_utils
collections: __init__ abc
concurrent: __init__
concurrent/futures: __init__ _base process thread
ctypes: __init__ _aix _endian util wintypes
curses: __init__ ascii has_key panel textpad
dbm: __init__ dumb gnu ndbm
email: __init__ _encoded_words _header_value_parser _parseaddr _policybase base64mime charset
email: contentmanager encoders errors feedparser generator header headerregistry iterators message
email: parser policy quoprimime utils
email/mime: application audio base image message multipart nonmultipart text
encodings: __init__ aliases ascii base64_codec big5 big5hkscs bz2_codec charmap cp037 cp1006 cp1026
encodings: cp1125 cp1140 cp1250 cp1251 cp1252 cp1253 cp1254 cp1255 cp1256 cp1257 cp1258 cp273 cp424
encodings: cp437 cp500 cp720 cp737 cp775 cp850 cp852 cp855 cp856 cp857 cp858 cp860 cp861 cp862 cp863
encodings: cp864 cp865 cp866 cp869 cp874 cp875 cp932 cp949 cp950 euc_jis_2004 euc_jisx0213 euc_jp
encodings: euc_kr gb18030 gb2312 gbk hex_codec hp_roman8 hz idna iso2022_jp iso2022_jp_1
encodings: iso2022_jp_2 iso2022_jp_2004 iso2022_jp_3 iso2022_jp_ext iso2022_kr iso8859_1 iso8859_10
encodings: iso8859_11 iso8859_13 iso8859_14 iso8859_15 iso8859_16 iso8859_2 iso8859_3 iso8859_4
encodings: iso8859_5 iso8859_6 iso8859_7 iso8859_8 iso8859_9 johab koi8_r koi8_t koi8_u kz1048
encodings: latin_1 mac_arabic mac_croatian mac_cyrillic mac_farsi mac_greek mac_iceland mac_latin2
encodings: mac_roman mac_romanian mac_turkish mbcs oem palmos ptcp154 punycode quopri_codec
encodings: raw_unicode_escape rot_13 shift_jis shift_jis_2004 shift_jisx0213 tis_620 undefined
encodings: unicode_escape utf_16 utf_16_be utf_16_le utf_32 utf_32_be utf_32_le utf_7 utf_8
encodings: utf_8_sig uu_codec zlib_codec
ensurepip: __init__ __main__ _uninstall
html: __init__ entities parser
http: __init__ client cookiejar cookies server
importlib: __init__ _abc _bootstrap _bootstrap_external abc machinery readers util
importlib/metadata: __init__ _adapters _collections _functools _itertools _meta _text
json: __init__ decoder encoder scanner tool
logging: __init__ config handlers
multiprocessing: __init__ connection context forkserver heap managers pool popen_fork
multiprocessing: popen_forkserver popen_spawn_posix popen_spawn_win32 process queues reduction
multiprocessing: resource_sharer resource_tracker shared_memory sharedctypes spawn synchronize util
multiprocessing/dummy: __init__ connection
sqlite3: __init__ dbapi2 dump
unittest: __init__ __main__ _log async_case case loader main mock result runner signals suite util
urllib: error parse request response robotparser
venv: __init__ __main__
wsgiref: __init__ handlers headers simple_server util validate
xml: __init__
xml/dom: NodeFilter __init__ domreg expatbuilder minicompat minidom pulldom xmlbuilder
xml/etree: ElementInclude ElementPath ElementTree __init__ cElementTree
xml/parsers: __init__ expat
xml/sax: __init__ _exceptions expatreader handler saxutils xmlreader
xmlrpc: __init__ client server
zoneinfo: __init__ _common _tzpath _zoneinfo
"""
STDLIB_FILES: tuple[str, ...] = tuple(
    f"{folder}/{name}.py" if folder else f"{name}.py"
    for folder, names in (line.split(":") for line in _STDLIB_FILES.strip().splitlines())
    for name in names.split())


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEGAZERO_CACHE") or Path.home() / ".cache" / "megazero")


def stdlib_source_files(max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[Path, list[Path]]:
    """(stdlib root, the selected source files in sorted order); see the module docstring."""
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates: list[tuple[str, Path, int]] = []
    for relative in sorted(STDLIB_FILES):
        path = root / relative
        size = path.stat().st_size if path.is_file() else 0
        if size > 0:
            candidates.append((relative, path, size))
    total = sum(size for _, _, size in candidates)
    keep = min(1.0, max_bytes / total) if total else 1.0
    selected, credit, taken = [], 0.0, 0
    for _, path, size in candidates:
        # Error diffusion: each file earns keep * size credit; take it when the credit covers it.
        credit += keep * size
        if credit >= size and taken + size <= max_bytes:
            selected.append(path)
            credit -= size
            taken += size
    return root, selected


def cache_key(root: Path, files: list[Path], vocab_size: int) -> str:
    """Folder name of a build: python version, vocab size, digest of recipe + file list + sizes."""
    digest = hashlib.sha256()
    digest.update(f"recipe={_RECIPE_VERSION}\nroot={root}\n".encode())
    for path in files:
        digest.update(f"{path.relative_to(root).as_posix()}\t{path.stat().st_size}\n".encode())
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    return f"stdlib-py{py}-v{vocab_size}-{digest.hexdigest()[:12]}"


def prepare_default_data(cache_dir: Path | str | None = None, vocab_size: int = 4096,
                         log: Callable[[str], object] = print, *,
                         max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[Path, Path]:
    """Build (or reuse) the default corpus; returns (data_prefix, tokenizer_model)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root, files = stdlib_source_files(max_bytes)
    if not files:
        raise DataError(f"{root}: no Python source files found for the default corpus; "
                        f"train on your own data instead (see docs/data.md)")
    key = cache_key(root, files, vocab_size)
    folder = cache_dir / key
    prefix, model, meta_path = folder / "data", folder / "tokenizer.model", folder / "meta.json"
    nbytes = sum(p.stat().st_size for p in files)
    what = (f"{len(files):,} Python standard-library source files (of {len(STDLIB_FILES)} listed) "
            f"from {root} ({nbytes / 1e6:.1f} MB), tokenizer vocab {vocab_size}")

    folder.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f"{key}.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"default data: waiting for another process to build {folder}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if meta_path.is_file() and model.is_file() and dataset_exists(prefix):
                meta = json.loads(meta_path.read_text())
                log(f"default data: {what}, {meta['num_tokens']:,} tokens, cached in {folder}")
                return prefix, model
            start = time.time()
            try:
                stats = _build(root, files, prefix, model, vocab_size)
            except OSError as err:  # a full disk, no permission: one line, not a traceback
                raise DataError(f"{folder}: cannot build the default corpus there ({err.strerror or err}); free "
                                f"space or pass --data-cache-dir DIR elsewhere") from None
            meta = {"recipe": _RECIPE_VERSION, "python": sys.version, "stdlib": str(root),
                    "num_files": len(files), "num_documents": stats[0], "num_tokens": stats[1],
                    "vocab_size": vocab_size, "bytes": nbytes}
            # written last, atomically: its presence marks a complete build
            atomic_write_bytes(meta_path, (json.dumps(meta, indent=1) + "\n").encode())
            log(f"default data: {what}, {stats[1]:,} tokens, built in {time.time() - start:.1f} s, "
                f"cached in {folder}")
            return prefix, model
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _documents(texts: list[str], names: list[str]) -> list[str]:
    """The corpus's documents in dataset order (see the module docstring).

    --split takes contiguous document ranges, and in path order valid/test would be only the
    alphabetically last packages (xml*, zoneinfo). So files go in a pseudo-random order that depends
    on each file's own path only (a file missing on one machine moves no other), small files first
    (stable), so that the short trailing valid/test ranges hold pieces of >= _TAIL_MIN_CHARS (~5k
    tokens), enough for a sample at any usual --seq-length. A large file is cut into pieces at line
    ends, which stay together: the ~460 files become ~650 documents, so 969,30,1 leaves the test
    split a document (it needs more than 500) and the validation split ~20.
    """
    order = sorted(range(len(texts)),
                   key=lambda i: hashlib.sha256(f"{_DOC_ORDER_SALT}/{names[i]}".encode()).digest())
    order = sorted(order, key=lambda i: len(texts[i]) >= _TAIL_MIN_CHARS)
    return [piece for i in order for piece in _pieces(texts[i], _TAIL_MIN_CHARS)]


def _pieces(text: str, min_chars: int) -> list[str]:
    """`text` cut at line ends into len(text) // min_chars pieces (at least one), each of at least
    min_chars characters when there are two or more; joined, they give `text` back."""
    count = max(1, len(text) // min_chars)
    size = len(text) // count
    out, start = [], 0
    while len(out) < count - 1:
        cut = text.find("\n", start + size) + 1
        if cut == 0 or len(text) - cut < min_chars:
            break
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def _build(root: Path, files: list[Path], prefix: Path, model: Path, vocab_size: int) -> tuple[int, int]:
    texts, names = [], []
    for path in files:
        try:
            texts.append(path.read_text(encoding="utf-8"))
            names.append(path.relative_to(root).as_posix())
        except (UnicodeDecodeError, OSError):
            continue  # deterministic for a given file list; such files are rare in a stdlib
    # train_tokenizer reads files: hand it the selection as one temporary JSON Lines file.
    corpus = prefix.with_name(f".corpus.{os.getpid()}.jsonl")
    try:
        with open(corpus, "w", encoding="utf-8") as f:
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")
        train_tokenizer([corpus], model, vocab_size, json_key="text")
    finally:
        corpus.unlink(missing_ok=True)
    stats = write_dataset(_documents(texts, names), Tokenizer(model), prefix,
                          num_threads=os.cpu_count() or 1)
    assert len(IndexedDataset(prefix)) == stats.num_documents
    return stats.num_documents, stats.num_tokens
