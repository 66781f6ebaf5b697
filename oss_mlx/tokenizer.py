"""The ``o200k_harmony`` tokenizer of gpt-oss, built on tiktoken.

The BPE ranks are OpenAI's public ``o200k_base`` vocabulary (199,998 tokens); harmony adds special
tokens at ids 199998..201087, which makes the 201,088-entry vocabulary of the model's embedding.

Where the ranks come from (first hit wins), see :func:`load_tokenizer`:

1. the model folder: ``o200k_base.tiktoken`` (written there by ``oss-mlx convert``), else a Hugging
   Face ``tokenizer.json`` (hub checkpoints ship one);
2. tiktoken's cache folders (``TIKTOKEN_CACHE_DIR``, ``DATA_GYM_CACHE_DIR``, ``$TMP/data-gym-cache``)
   and openai-harmony's (``TIKTOKEN_RS_CACHE_DIR``);
3. a download through tiktoken's loader (skipped when ``HF_HUB_OFFLINE`` or ``OSS_MLX_OFFLINE`` is set,
   or when its server does not answer a quick connect: ``hub.network_unavailable``, the loader's rule).
"""

from __future__ import annotations

import base64
import codecs
import functools
import hashlib
import json
import os
import shutil
import tempfile
import threading
import types
from collections.abc import Iterable, Mapping
from pathlib import Path

import tiktoken

from .errors import LoadError

__all__ = [
    "VOCAB_FILENAME",
    "VOCAB_SIZE",
    "NUM_BPE_TOKENS",
    "O200K_BASE_URL",
    "O200K_BASE_SHA256",
    "SPECIAL_TOKENS",
    "TokenizerError",
    "TokenizerNotFoundError",
    "HarmonyTokenizer",
    "StreamingDecoder",
    "load_tokenizer",
    "load_ranks",
    "copy_vocabulary",
    "read_tiktoken_ranks",
    "write_tiktoken_ranks",
    "ranks_from_tokenizer_json",
    "ranks_to_tokenizer_json",
    "write_tokenizer_json",
    "o200k_pattern",
]

VOCAB_FILENAME = "o200k_base.tiktoken"
VOCAB_SIZE = 201088
NUM_BPE_TOKENS = 199998
O200K_BASE_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
# tiktoken (and openai-harmony) name a cached download by the sha1 of its address.
_CACHE_KEY = hashlib.sha1(O200K_BASE_URL.encode()).hexdigest()


def _special_tokens() -> dict[str, int]:
    named = {
        199998: "<|startoftext|>",
        199999: "<|endoftext|>",
        200002: "<|return|>",
        200003: "<|constrain|>",
        200005: "<|channel|>",
        200006: "<|start|>",
        200007: "<|end|>",
        200008: "<|message|>",
        200012: "<|call|>",
    }
    # Every other id above the BPE ranks is reserved; the name carries the id.
    return {named.get(i, f"<|reserved_{i}|>"): i for i in range(NUM_BPE_TOKENS, VOCAB_SIZE)}


SPECIAL_TOKENS: Mapping[str, int] = _special_tokens()


class TokenizerError(LoadError, RuntimeError):
    """Base class of the tokenizer's errors."""


class TokenizerNotFoundError(TokenizerError):
    """The o200k_base vocabulary could not be found (and could not be downloaded)."""


# --------------------------------------------------------------------------------------------------
# Vocabulary files
# --------------------------------------------------------------------------------------------------


def o200k_pattern() -> str:
    """The o200k_base pre-tokenizer regex, read from the installed tiktoken (never retyped here)."""
    return _o200k_pattern()


@functools.lru_cache(maxsize=1)
def _o200k_pattern() -> str:
    import tiktoken_ext.openai_public as public

    # tiktoken's constructor loads (and may download) the ranks before it returns the pattern. Run a copy
    # of it whose loader is a stub, so only the pattern is read; the module itself is left untouched.
    stub_globals = {**public.o200k_base.__globals__, "load_tiktoken_bpe": lambda *args, **kwargs: {}}
    constructor = types.FunctionType(public.o200k_base.__code__, stub_globals)
    return constructor()["pat_str"]


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` file (one ``base64(token) rank`` per line)."""
    return _parse_tiktoken(Path(path).read_bytes(), str(path))


def _parse_tiktoken(data: bytes, origin: str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    try:
        for line in data.splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    except (ValueError, TypeError) as e:
        raise TokenizerError(f"{origin} is not a tiktoken vocabulary file: {e}") from e
    _check_ranks(ranks, origin)
    return ranks


def write_tiktoken_ranks(ranks: Mapping[bytes, int], path: str | Path) -> Path:
    """Write ranks in tiktoken's file format (the inverse of :func:`read_tiktoken_ranks`)."""
    path = Path(path)
    lines = [
        base64.b64encode(tok) + b" " + str(rank).encode() for tok, rank in sorted(ranks.items(), key=_by_rank)
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _by_rank(item: tuple[bytes, int]) -> int:
    return item[1]


def _check_ranks(ranks: Mapping[bytes, int], origin: str) -> None:
    # A different vocabulary would silently produce garbage; a truncated file would crash later.
    if len(ranks) != NUM_BPE_TOKENS or set(ranks.values()) != set(range(NUM_BPE_TOKENS)):
        raise TokenizerError(
            f"{origin} does not hold the o200k_base vocabulary "
            f"({len(ranks)} tokens, expected ranks 0..{NUM_BPE_TOKENS - 1})"
        )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, used by Hugging Face byte-level BPE."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def ranks_from_tokenizer_json(path: str | Path) -> dict[bytes, int]:
    """Derive tiktoken ranks from a Hugging Face ``tokenizer.json`` (``model.vocab``, byte-level BPE).

    In a byte-level BPE the token id is the merge rank, so the vocabulary alone gives the ranks; added
    (special) tokens above the BPE range are ignored.
    """
    try:
        vocab = json.loads(Path(path).read_text(encoding="utf-8"))["model"]["vocab"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TokenizerError(f"cannot read model.vocab from {path}: {e}") from e
    # str.translate maps the byte-level alphabet back to latin-1 code points, i.e. to the raw bytes.
    to_latin1 = {ord(ch): b for b, ch in _bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for text, rank in vocab.items():
        if rank < NUM_BPE_TOKENS:
            raw = text.translate(to_latin1)
            try:
                ranks[raw.encode("latin-1")] = rank
            except UnicodeEncodeError as e:
                raise TokenizerError(f"{path}: token {text!r} is not byte-level BPE") from e
    _check_ranks(ranks, str(path))
    return ranks


def ranks_to_tokenizer_json(ranks: Mapping[bytes, int]) -> dict:
    """A minimal ``tokenizer.json``-shaped dict (``model.vocab`` + special ``added_tokens``).

    Merges are left out: enough for :func:`ranks_from_tokenizer_json` and for test fixtures, not a
    complete Hugging Face tokenizer.
    """
    from_latin1 = {b: ch for b, ch in _bytes_to_unicode().items()}
    vocab = {tok.decode("latin-1").translate(from_latin1): rank for tok, rank in ranks.items()}
    added = [{"id": i, "content": name, "special": True} for name, i in SPECIAL_TOKENS.items()]
    return {"version": "1.0", "added_tokens": added, "model": {"type": "BPE", "vocab": vocab, "merges": []}}


def write_tokenizer_json(ranks: Mapping[bytes, int], path: str | Path) -> Path:
    """Write :func:`ranks_to_tokenizer_json` to ``path``."""
    path = Path(path)
    path.write_text(json.dumps(ranks_to_tokenizer_json(ranks), ensure_ascii=False), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# Finding the vocabulary
# --------------------------------------------------------------------------------------------------


def _cache_dirs() -> list[Path]:
    """tiktoken's cache folder (same precedence as tiktoken), then openai-harmony's."""
    dirs: list[Path] = []
    if os.environ.get("TIKTOKEN_CACHE_DIR"):
        dirs.append(Path(os.environ["TIKTOKEN_CACHE_DIR"]))
    elif os.environ.get("DATA_GYM_CACHE_DIR"):
        dirs.append(Path(os.environ["DATA_GYM_CACHE_DIR"]))
    else:
        dirs.append(Path(tempfile.gettempdir()) / "data-gym-cache")
    if os.environ.get("TIKTOKEN_RS_CACHE_DIR"):
        dirs.append(Path(os.environ["TIKTOKEN_RS_CACHE_DIR"]))
    return dirs


def _download_ranks() -> dict[bytes, int]:
    """tiktoken's own loader: reads its cache, else downloads and caches the file."""
    from tiktoken.load import read_file_cached

    return _parse_tiktoken(read_file_cached(O200K_BASE_URL, O200K_BASE_SHA256), O200K_BASE_URL)


_ranks_lock = threading.Lock()
_ranks_cache: dict[tuple, dict[bytes, int]] = {}


def _file_key(path: Path) -> tuple:
    stat = path.stat()
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def _cached(key: tuple, reader) -> dict[bytes, int]:
    # Parsing the 200k ranks takes a while; each file is read once per process (until it changes).
    with _ranks_lock:
        if key not in _ranks_cache:
            _ranks_cache[key] = reader()
        return _ranks_cache[key]


def _read_verified(path: Path) -> dict[bytes, int] | None:
    data = path.read_bytes()
    # A partial or foreign file in a cache folder is skipped, as tiktoken does.
    if hashlib.sha256(data).hexdigest() != O200K_BASE_SHA256:
        return None
    return _parse_tiktoken(data, str(path))


def _find_ranks(model_dir: str | Path | None) -> tuple[dict[bytes, int], str, tuple]:
    """(ranks, where they came from, cache key)."""
    searched: list[str] = []
    if model_dir is not None:
        model_dir = Path(model_dir)
        vocab_file, hf_file = model_dir / VOCAB_FILENAME, model_dir / "tokenizer.json"
        if vocab_file.is_file():
            key = _file_key(vocab_file)
            return _cached(key, lambda: read_tiktoken_ranks(vocab_file)), str(vocab_file), key
        if hf_file.is_file():
            key = _file_key(hf_file)
            return _cached(key, lambda: ranks_from_tokenizer_json(hf_file)), str(hf_file), key
        searched.append(f"{vocab_file} and {hf_file} (model folder)")
    for folder in _cache_dirs():
        cached = folder / _CACHE_KEY
        if cached.is_file():
            key = _file_key(cached)
            with _ranks_lock:
                ranks = _ranks_cache.get(key)
            if ranks is None:
                ranks = _read_verified(cached)
                if ranks is not None:
                    ranks = _cached(key, lambda r=ranks: r)
            if ranks is not None:
                return ranks, str(cached), key
            searched.append(f"{cached} (cache; content does not match o200k_base, skipped)")
        else:
            searched.append(f"{cached} (cache)")
    from .hub import network_unavailable

    reason = network_unavailable(O200K_BASE_URL)
    if reason is not None:
        searched.append(f"{O200K_BASE_URL} (not tried: {reason})")
    else:
        try:
            key = (O200K_BASE_URL,)
            return _cached(key, _download_ranks), O200K_BASE_URL, key
        except Exception as e:  # any network / IO failure ends in the same advice
            searched.append(f"{O200K_BASE_URL} (download failed: {type(e).__name__}: {e})")
    raise TokenizerNotFoundError(
        "The o200k_base vocabulary (o200k_base.tiktoken) was not found. Searched:\n  - "
        + "\n  - ".join(searched)
        + "\nTo fix, do one of:\n"
        f"  - set TIKTOKEN_CACHE_DIR to a folder holding the file, named {_CACHE_KEY};\n"
        "  - connect to the internet once so that tiktoken downloads and caches it;\n"
        f"  - convert the model with `oss-mlx convert`, which copies the vocabulary into the model folder "
        f"as {VOCAB_FILENAME}."
    )


def load_ranks(model_dir: str | Path | None = None) -> dict[bytes, int]:
    """The o200k_base BPE ranks, searched as described in :func:`load_tokenizer`."""
    return _find_ranks(model_dir)[0]


def copy_vocabulary(dest_dir: str | Path, model_dir: str | Path | None = None) -> Path:
    """Write ``o200k_base.tiktoken`` into ``dest_dir`` (the converter calls this) and return its path.

    The source is found as in :func:`load_tokenizer` (``model_dir`` first, when given). A tiktoken file
    is copied byte for byte; ranks from a ``tokenizer.json`` or a download are written out.
    """
    dest = Path(dest_dir) / VOCAB_FILENAME
    dest.parent.mkdir(parents=True, exist_ok=True)
    ranks, source, _ = _find_ranks(model_dir)
    source_path = Path(source)
    if source_path.is_file() and source_path.name != "tokenizer.json":
        if source_path.resolve() != dest.resolve():
            shutil.copyfile(source_path, dest)
    else:
        write_tiktoken_ranks(ranks, dest)
    return dest


# --------------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------------


class HarmonyTokenizer:
    """o200k_harmony: encode / decode text and name the harmony special tokens.

    Generation stops on :attr:`RETURN` (final answer done) or :attr:`CALL` (tool call, waiting for the
    result); both are in :attr:`stop_ids`. :attr:`END` only ends one message — the model then goes on
    with ``<|start|>assistant`` for its next message (e.g. the final answer after the analysis).
    """

    STARTOFTEXT = SPECIAL_TOKENS["<|startoftext|>"]
    ENDOFTEXT = SPECIAL_TOKENS["<|endoftext|>"]
    RETURN = SPECIAL_TOKENS["<|return|>"]
    CONSTRAIN = SPECIAL_TOKENS["<|constrain|>"]
    CHANNEL = SPECIAL_TOKENS["<|channel|>"]
    START = SPECIAL_TOKENS["<|start|>"]
    END = SPECIAL_TOKENS["<|end|>"]
    MESSAGE = SPECIAL_TOKENS["<|message|>"]
    CALL = SPECIAL_TOKENS["<|call|>"]

    vocab_size: int = VOCAB_SIZE
    stop_ids: tuple[int, ...] = (RETURN, CALL)
    message_end_ids: tuple[int, ...] = (END, RETURN, CALL)

    def __init__(self, mergeable_ranks: Mapping[bytes, int], source: str = "<memory>") -> None:
        self.source = source
        self.special_tokens: Mapping[str, int] = SPECIAL_TOKENS
        self._encoding = tiktoken.Encoding(
            name="o200k_harmony",
            pat_str=_o200k_pattern(),
            mergeable_ranks=dict(mergeable_ranks),
            special_tokens=dict(SPECIAL_TOKENS),
            explicit_n_vocab=VOCAB_SIZE,
        )
        self._grammar_lock = threading.Lock()
        self._grammar_tokenizer = None

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The underlying tiktoken encoding."""
        return self._encoding

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``; special-token text (e.g. ``<|start|>``) becomes a special id only
        when ``allow_special`` is true, else it is encoded as ordinary text."""
        if allow_special:
            return self._encoding.encode(text, allowed_special="all")
        return self._encoding.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; invalid UTF-8 becomes U+FFFD."""
        return self._encoding.decode(list(ids), errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Raw bytes of ``ids`` (special tokens give their text)."""
        return self._encoding.decode_bytes(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        """Bytes of one token; a token may hold part of a UTF-8 character."""
        return self._encoding.decode_single_token_bytes(token_id)

    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is one of the harmony special / reserved tokens."""
        return NUM_BPE_TOKENS <= token_id < VOCAB_SIZE

    def token_id(self, special: str) -> int:
        """Id of a special token by its text, e.g. ``"<|start|>"``."""
        return SPECIAL_TOKENS[special]

    def streaming_decoder(self) -> StreamingDecoder:
        """A new :class:`StreamingDecoder` over this tokenizer."""
        return StreamingDecoder(self)

    def grammar_tokenizer(self):
        """This vocabulary as llguidance's ``LLTokenizer`` (built once, ~1 s, on first use).

        Built from our encoding, not tiktoken's ``o200k_harmony``: that one names id 200018 twice
        (``<|endofprompt|>`` from o200k_base and ``<|reserved_200018|>``, tiktoken#457), which makes
        llguidance count 201,089 tokens (a mask one bit wider than the logits) and drop one name. Ours
        has one name per id, the names the renderer and parser use. The end-of-sequence id given to
        llguidance is ``<|endoftext|>``, which no grammar of ours uses: the turn grammars name
        ``<|return|>`` / ``<|call|>`` themselves.
        """
        with self._grammar_lock:
            if self._grammar_tokenizer is None:
                import llguidance.tiktoken  # imported here: only constrained replies need it

                self._grammar_tokenizer = llguidance.tiktoken.lltokenizer_from_encoding(
                    self._encoding, n_vocab=self.vocab_size, eos_token=self.ENDOFTEXT
                )
            return self._grammar_tokenizer

    def __repr__(self) -> str:
        return f"HarmonyTokenizer(vocab_size={self.vocab_size}, source={self.source!r})"


class StreamingDecoder:
    """Turns a stream of token ids into text, never splitting a UTF-8 character.

    ``feed`` returns the text completed by the new ids; bytes of an unfinished character wait for the
    next ids. ``finish`` flushes what is left (an unfinished character becomes U+FFFD).
    """

    def __init__(self, tokenizer: HarmonyTokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: int | Iterable[int]) -> str:
        """Add one id or several; return the newly completed text."""
        if isinstance(ids, int):
            data = self._tokenizer.token_bytes(ids)
        else:
            data = b"".join(self._tokenizer.token_bytes(i) for i in ids)
        return self._utf8.decode(data)

    def feed_bytes(self, data: bytes) -> str:
        """Add raw bytes; return the newly completed text."""
        return self._utf8.decode(data)

    @property
    def pending(self) -> bool:
        """Whether bytes of an unfinished character are held back."""
        return bool(self._utf8.getstate()[0])

    def finish(self) -> str:
        """Flush the held-back bytes and reset."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


_tokenizer_lock = threading.Lock()
_tokenizers: dict[tuple, HarmonyTokenizer] = {}


def load_tokenizer(model_dir: str | Path | None = None) -> HarmonyTokenizer:
    """Load the o200k_harmony tokenizer (cached: one instance per vocabulary file).

    The vocabulary is searched (1) in ``model_dir``: ``o200k_base.tiktoken``, else ``tokenizer.json``;
    (2) in tiktoken's and openai-harmony's cache folders; (3) by downloading through tiktoken, unless
    ``HF_HUB_OFFLINE=1`` or ``OSS_MLX_OFFLINE=1`` or its server does not answer a quick connect.
    Raises :class:`TokenizerNotFoundError`, naming the places searched and the fixes, when none works.
    """
    ranks, source, key = _find_ranks(model_dir)
    with _tokenizer_lock:
        tok = _tokenizers.get(key)
        if tok is None:
            tok = _tokenizers[key] = HarmonyTokenizer(ranks, source)
        return tok
