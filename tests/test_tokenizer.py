"""o200k_harmony tokenizer: equal to openai-harmony's, loadable from a model folder, clear when missing."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from conftest import VOCAB_FILE

from oss_mlx import tokenizer as tk
from oss_mlx.tokenizer import (
    VOCAB_FILENAME,
    HarmonyTokenizer,
    TokenizerError,
    TokenizerNotFoundError,
    copy_vocabulary,
    load_tokenizer,
    ranks_from_tokenizer_json,
    ranks_to_tokenizer_json,
    read_tiktoken_ranks,
    write_tokenizer_json,
)

SAMPLE_TEXTS = [
    "Hello, world!",
    "naïve café — Ünïcödé, 日本語のテキスト, 한국어, русский текст, עברית",
    "emoji 🎉👩‍👩‍👧‍👦 🇫🇷 and math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tindented\r\nwindows",
    "   leading and trailing spaces   \n\n\n",
    "numbers 1234567890 3.14159 -42 1e-9",
    'JSON {"location": "Tokyo", "unit": "celsius", "list": [1, 2, 3]}',
    "text with <|start|>assistant<|channel|>final<|message|> inside <|end|>",
    "",
]


@pytest.fixture(scope="module")
def model_folder(vocab_dir: Path, tmp_path_factory) -> Path:
    """A model folder as the converter leaves it: the vocabulary file beside the weights."""
    folder = tmp_path_factory.mktemp("model")
    (folder / VOCAB_FILENAME).write_bytes((vocab_dir / VOCAB_FILE).read_bytes())
    return folder


@pytest.fixture(scope="module")
def tok(model_folder: Path) -> HarmonyTokenizer:
    return load_tokenizer(model_folder)


@pytest.fixture(scope="module")
def harmony_enc(vocab_dir: Path):
    oh = pytest.importorskip("openai_harmony")
    os.environ.setdefault("TIKTOKEN_RS_CACHE_DIR", str(vocab_dir))
    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


# --- special tokens -------------------------------------------------------------------------------


def test_special_ids_match_openai_harmony(tok: HarmonyTokenizer, harmony_enc) -> None:
    assert tok.vocab_size == 201088
    for i in range(tk.NUM_BPE_TOKENS, tk.VOCAB_SIZE):
        name = harmony_enc.decode([i])
        assert harmony_enc.is_special_token(i)
        assert tok.decode([i]) == name
        assert tk.SPECIAL_TOKENS[name] == i
        assert tok.encode(name, allow_special=True) == [i]
    # openai-harmony also decodes 201088 (<|reserved_201088|>), one past the model's 201088-row
    # embedding; the model can never produce it, so it is not in our vocabulary.
    assert set(tk.SPECIAL_TOKENS) == harmony_enc.special_tokens_set - {"<|reserved_201088|>"}
    assert not harmony_enc.is_special_token(tk.NUM_BPE_TOKENS - 1)


def test_named_constants(tok: HarmonyTokenizer, harmony_enc) -> None:
    expected = {
        "STARTOFTEXT": (199998, "<|startoftext|>"),
        "ENDOFTEXT": (199999, "<|endoftext|>"),
        "RETURN": (200002, "<|return|>"),
        "CONSTRAIN": (200003, "<|constrain|>"),
        "CHANNEL": (200005, "<|channel|>"),
        "START": (200006, "<|start|>"),
        "END": (200007, "<|end|>"),
        "MESSAGE": (200008, "<|message|>"),
        "CALL": (200012, "<|call|>"),
    }
    for attr, (i, text) in expected.items():
        assert getattr(tok, attr) == i == tok.token_id(text)
    assert tok.decode([200000, 200004, 200009, 200013, 201087]) == (
        "<|reserved_200000|><|reserved_200004|><|reserved_200009|><|reserved_200013|><|reserved_201087|>"
    )
    # Generation stops on <|return|> / <|call|>, as openai-harmony's stop tokens for assistant actions.
    assert set(tok.stop_ids) == set(harmony_enc.stop_tokens_for_assistant_actions())
    assert set(tok.message_end_ids) == set(harmony_enc.stop_tokens())
    assert tok.is_special(200006) and not tok.is_special(tk.NUM_BPE_TOKENS - 1)


# --- encode / decode ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_encode_matches_openai_harmony(tok: HarmonyTokenizer, harmony_enc, text: str) -> None:
    assert tok.encode(text) == harmony_enc.encode(text, disallowed_special=())
    assert tok.encode(text, allow_special=True) == harmony_enc.encode(text, allowed_special="all")


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_round_trip(tok: HarmonyTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode()
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()


def test_allow_special(tok: HarmonyTokenizer) -> None:
    text = "<|start|>user<|message|>hi<|end|>"
    special = tok.encode(text, allow_special=True)
    assert special == [tok.START, *tok.encode("user"), tok.MESSAGE, *tok.encode("hi"), tok.END]
    ordinary = tok.encode(text)
    assert not any(tok.is_special(i) for i in ordinary)
    assert tok.decode(ordinary) == tok.decode(special) == text


def test_pattern_read_from_tiktoken(vocab_dir: Path, monkeypatch) -> None:
    import tiktoken

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(vocab_dir))
    assert tk.o200k_pattern() == tiktoken.get_encoding("o200k_base")._pat_str


# --- streaming detokenization ---------------------------------------------------------------------


def test_streaming_decoder_holds_back_partial_utf8(tok: HarmonyTokenizer) -> None:
    text = "math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 — 🎉👩‍👩‍👧 ok"
    ids = tok.encode(text)
    # The test only means something if some token ends inside a character.
    assert any(_not_utf8(tok.token_bytes(i)) for i in ids)
    dec = tok.streaming_decoder()
    pieces = [dec.feed(i) for i in ids]
    pieces.append(dec.finish())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_streaming_decoder_flushes_incomplete_tail(tok: HarmonyTokenizer) -> None:
    dec = tk.StreamingDecoder(tok)
    assert dec.feed_bytes("é".encode()[:1]) == ""
    assert dec.pending
    assert dec.finish() == "\ufffd"
    assert dec.feed(tok.encode("ok")) == "ok"


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return True
    return False


# --- finding the vocabulary -----------------------------------------------------------------------


def test_tokenizer_json_ranks_equal_tiktoken_ranks(
    vocab_dir: Path, tok: HarmonyTokenizer, tmp_path: Path
) -> None:
    ranks = read_tiktoken_ranks(vocab_dir / VOCAB_FILE)
    shaped = ranks_to_tokenizer_json(ranks)
    # Hugging Face's byte-level alphabet (GPT-2's byte-to-unicode map): " the" is "Ġthe".
    assert shaped["model"]["vocab"]["Ġthe"] == ranks[b" the"]
    assert {t["content"]: t["id"] for t in shaped["added_tokens"]}["<|call|>"] == 200012
    folder = tmp_path / "hub-model"
    folder.mkdir()
    write_tokenizer_json(ranks, folder / "tokenizer.json")
    assert ranks_from_tokenizer_json(folder / "tokenizer.json") == ranks
    from_json = load_tokenizer(folder)
    assert from_json.source == str(folder / "tokenizer.json")
    text = SAMPLE_TEXTS[2] + SAMPLE_TEXTS[3]
    assert from_json is not tok
    assert from_json.encode(text) == tok.encode(text)


def test_load_from_model_folder_and_copy_vocabulary(vocab_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(vocab_dir))
    dest = copy_vocabulary(tmp_path / "converted")
    assert dest == tmp_path / "converted" / VOCAB_FILENAME
    assert dest.read_bytes() == (vocab_dir / VOCAB_FILE).read_bytes()
    # The folder's own file wins over the caches, even with the caches gone.
    _no_network_no_cache(monkeypatch, tmp_path / "empty")
    tok = load_tokenizer(dest.parent)
    assert tok.source == str(dest)
    assert load_tokenizer(dest.parent) is tok  # cached
    assert tok.decode(tok.encode("offline ✓")) == "offline ✓"
    # Copying from a folder that has tokenizer.json only writes the ranks out.
    hub = tmp_path / "hub"
    hub.mkdir()
    write_tokenizer_json(read_tiktoken_ranks(dest), hub / "tokenizer.json")
    assert copy_vocabulary(tmp_path / "again", model_dir=hub).read_bytes() == dest.read_bytes()


def _no_network_no_cache(monkeypatch, empty: Path) -> list[str]:
    """Point every cache at an empty folder and make any download attempt fail (and be recorded)."""
    empty.mkdir(parents=True, exist_ok=True)
    for var in ("DATA_GYM_CACHE_DIR", "HF_HUB_OFFLINE", "OSS_MLX_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(empty))
    monkeypatch.setenv("TIKTOKEN_RS_CACHE_DIR", str(empty))
    monkeypatch.setattr("tempfile.tempdir", str(empty))
    attempts: list[str] = []

    def no_download(blobpath: str) -> bytes:
        attempts.append(blobpath)
        raise ConnectionError("network disabled in tests")

    def no_connect(self, *args, **kwargs):
        raise ConnectionError("network disabled in tests")

    monkeypatch.setattr("tiktoken.load.read_file", no_download)
    monkeypatch.setattr(socket.socket, "connect", no_connect)
    return attempts


def test_missing_vocabulary_offline(tmp_path: Path, monkeypatch) -> None:
    from oss_mlx import hub

    attempts = _no_network_no_cache(monkeypatch, tmp_path / "empty-cache")
    model = tmp_path / "model-without-vocab"
    model.mkdir()
    hub.hub_unreachable.cache_clear()  # the probe's answers are kept per process
    try:
        # No network: one quick connect says so, as for the model's files; no download is tried.
        with pytest.raises(TokenizerNotFoundError) as info:
            load_tokenizer(model)
        message = str(info.value)
        assert attempts == []
        assert f"{tk.O200K_BASE_URL} (not tried: cannot connect to" in message
        assert str(model / VOCAB_FILENAME) in message
        assert str(tmp_path / "empty-cache" / VOCAB_FILE) in message
        assert "TIKTOKEN_CACHE_DIR" in message and "oss-mlx convert" in message and "internet" in message
        assert isinstance(info.value, RuntimeError)
    finally:
        hub.hub_unreachable.cache_clear()

    # The server answers but the download fails: the failure is named.
    monkeypatch.setattr(hub, "hub_unreachable", lambda url=None: None)
    with pytest.raises(TokenizerNotFoundError, match="download failed"):
        load_tokenizer(model)
    assert attempts == [tk.O200K_BASE_URL]

    # With offline mode set, no download is even tried.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TokenizerNotFoundError, match="offline mode"):
        load_tokenizer()
    assert len(attempts) == 1


def test_foreign_vocabulary_file_is_rejected(tmp_path: Path) -> None:
    (tmp_path / VOCAB_FILENAME).write_bytes(b"YQ== 0\nYg== 1\n")
    with pytest.raises(TokenizerError, match="does not hold the o200k_base vocabulary"):
        load_tokenizer(tmp_path)
    (tmp_path / VOCAB_FILENAME).write_bytes(b"not a vocabulary at all\n")
    with pytest.raises(TokenizerError, match="not a tiktoken vocabulary"):
        load_tokenizer(tmp_path)
