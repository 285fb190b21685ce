"""A thin tokenizer wrapper over ``tokenizers.Tokenizer``, and the synthetic word-level tokenizer.

Design decisions:
- One class serves the synthetic tokenizer and real Hugging Face models: both are a ``tokenizer.json``
  plus optional ``tokenizer_config.json`` / ``special_tokens_map.json``. Only the fast ``tokenizers``
  runtime is used, never ``transformers``, so loading is quick and has no hub or network access.
- ``encode`` never adds special tokens (no BOS/EOS from a post-processor). Where a sequence needs BOS or
  EOS, the caller appends ``bos_id``/``eos_id`` explicitly, so the student and teacher token streams are
  built the same way for every model. Special tokens written literally in the text (chat-template
  markers) are still recognised, as they must be.
- ``decode`` skips special tokens and rejects ids outside the vocabulary with a clear error: the
  ``tokenizers`` runtime silently drops them, which would hide an embedding/vocab size mismatch.
- Special-token resolution: ``tokenizer_config.json`` wins over ``special_tokens_map.json`` where both
  name a token (values may be strings or serialized AddedToken objects); failing both, well-known names
  present in the vocabulary. An explicit null BOS/UNK in a config means "none".
  EOS is required (generation has to stop). PAD falls back to EOS, the usual choice for decoder-only
  models, because padded positions are masked anyway. BOS is optional.
- ``vocab_size`` is the tokenizer's own size including added tokens. A model's embedding table may be
  padded larger; that padding belongs to the model config, not here.
- Synthetic tokenizer: a real WordLevel model, WhitespaceSplit pre-tokenizer, and a WordPiece decoder
  with cleanup off whose continuation prefix is a single space. No vocabulary word can contain whitespace,
  so that prefix never matches and every word after the first is joined with exactly one space:
  ``decode(encode(s)) == " ".join(s.split())`` for in-vocabulary words. A real decoder (rather than the
  runtime's implicit join) serialises into tokenizer.json, so Hugging Face's loaders decode identically.
- Synthetic ids are fixed: specials, digits, confidence values, template words in a fixed order, then
  ``extra_words`` sorted. Sorting makes ids independent of the iteration order of the argument (a set
  of strings iterates in a hash-seed-dependent order). ``<unk>`` is special, so unknown words encode to
  ``unk_id`` and vanish on decode.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from caopd_megatron.config.schema import CONFIDENCE_MARKER

__all__ = [
    "CONFIDENCE_TOKENS",
    "SPECIAL_TOKENS",
    "TEMPLATE_WORDS",
    "TextTokenizer",
    "TokenizerError",
    "build_synthetic_tokenizer",
]

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))
CONFIDENCE_TOKENS: tuple[str, ...] = tuple(f"{i / 10:.1f}" for i in range(11))
TEMPLATE_WORDS: tuple[str, ...] = ("Q", "=", CONFIDENCE_MARKER, "Reference:", "Note:", "A")

# Tried in order when no config names an EOS/BOS token.
_EOS_CANDIDATES = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>", "<|eot_id|>")
_BOS_CANDIDATES = ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>")
_UNK_CANDIDATES = ("<unk>", "[UNK]")


class TokenizerError(ValueError):
    """A tokenizer file is missing or inconsistent, or ids/tokens are invalid for this vocabulary."""


class TextTokenizer:
    """Text <-> ids for one vocabulary, with the special-token ids the pipeline needs."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        eos_token: str,
        pad_token: str | None = None,
        bos_token: str | None = None,
        unk_token: str | None = None,
    ) -> None:
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"expected a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        self._tok = tokenizer
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_token = eos_token
        self.pad_token = pad_token if pad_token is not None else eos_token
        self.bos_token = bos_token
        self.unk_token = unk_token
        self.eos_id: int = self._require_id(eos_token, "eos")
        self.pad_id: int = self._require_id(self.pad_token, "pad")
        self.bos_id: int | None = None if bos_token is None else self._require_id(bos_token, "bos")
        self.unk_id: int | None = None if unk_token is None else self._require_id(unk_token, "unk")

    def _require_id(self, token: str, role: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{role} token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    @property
    def backend(self) -> Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    # --- loading / saving ------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path) -> "TextTokenizer":
        """Load from a ``tokenizer.json`` file or a folder containing one (and optional config files)."""
        p = Path(path)
        if p.is_dir():
            folder, file = p, p / "tokenizer.json"
            if not file.is_file():
                raise TokenizerError(f"no tokenizer.json in folder {p}")
        elif p.is_file():
            folder, file = p.parent, p
        else:
            raise TokenizerError(f"tokenizer path not found: {p}")
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as exc:  # the Rust runtime raises a bare Exception for parse errors
            raise TokenizerError(f"cannot load tokenizer {file}: {exc}") from None

        specials: dict[str, str | None] = {}
        # special_tokens_map.json first, then tokenizer_config.json on top: the config wins where both say.
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            cfg_path = folder / name
            if cfg_path.is_file():
                for role, value in _read_special_tokens(cfg_path).items():
                    specials[role] = value
        vocab_has = lambda t: tok.token_to_id(t) is not None  # noqa: E731
        eos = specials.get("eos") or next((t for t in _EOS_CANDIDATES if vocab_has(t)), None)
        if eos is None:
            raise TokenizerError(
                f"cannot tell the EOS token of {file}: no eos_token in tokenizer_config.json or "
                f"special_tokens_map.json, and none of {', '.join(_EOS_CANDIDATES)} is in the vocabulary"
            )
        # An explicit null in a config means "none"; a missing key means "look for a usual name".
        bos = specials["bos"] if "bos" in specials else next((t for t in _BOS_CANDIDATES if vocab_has(t)), None)
        unk = specials["unk"] if "unk" in specials else next((t for t in _UNK_CANDIDATES if vocab_has(t)), None)
        pad = specials.get("pad")
        return cls(tok, eos_token=eos, pad_token=pad, bos_token=bos, unk_token=unk)

    def save(self, folder: str | Path) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (loadable by PreTrainedTokenizerFast)."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(out / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "bos_token": self.bos_token,
            "unk_token": self.unk_token,
            # Off, or transformers would "clean up" spaces before punctuation and break the round trip.
            "clean_up_tokenization_spaces": False,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return out

    # --- text <-> ids ----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special tokens are added."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens skipped; ids outside the vocabulary raise TokenizerError."""
        if hasattr(ids, "tolist"):  # torch tensors / numpy arrays
            ids = ids.tolist()
        clean: list[int] = []
        for position, raw in enumerate(ids):
            if isinstance(raw, bool) or not isinstance(raw, int):
                try:
                    value = int(raw)
                except (TypeError, ValueError):
                    raise TokenizerError(f"token id at position {position} is not an integer: {raw!r}") from None
                if value != raw:
                    raise TokenizerError(f"token id at position {position} is not an integer: {raw!r}")
            else:
                value = raw
            if not 0 <= value < self.vocab_size:
                raise TokenizerError(
                    f"token id {value} at position {position} is outside the vocabulary (size {self.vocab_size})"
                )
            clean.append(value)
        return self._tok.decode(clean, skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"TextTokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}, "
            f"pad={self.pad_token!r}, bos={self.bos_token!r})"
        )


def _read_special_tokens(path: Path) -> dict[str, str | None]:
    """Special-token names from an HF config file; values may be strings, AddedToken dicts or null."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object")
    found: dict[str, str | None] = {}
    for role in ("eos", "pad", "bos", "unk"):
        key = f"{role}_token"
        if key not in data:
            continue
        value = data[key]
        if isinstance(value, dict):
            value = value.get("content")
        if value is not None and not isinstance(value, str):
            raise TokenizerError(f"{path}: {key} must be a string, an AddedToken object or null")
        found[role] = value
    return found


def build_synthetic_tokenizer(extra_words: Iterable[str] = ()) -> TextTokenizer:
    """The word-level tokenizer of the synthetic tasks (specials, digits, confidences, template words)."""
    if isinstance(extra_words, str):
        raise TypeError("extra_words must be an iterable of words, not a single string")
    base = [*SPECIAL_TOKENS, *DIGITS, *CONFIDENCE_TOKENS, *TEMPLATE_WORDS]
    extras: set[str] = set()
    for word in extra_words:
        if not isinstance(word, str) or not word:
            raise TokenizerError(f"extra word must be a non-empty string, got {word!r}")
        if word.split() != [word]:
            raise TokenizerError(f"extra word {word!r} contains whitespace; words are whitespace-separated")
        extras.add(word)
    words = base + sorted(extras - set(base))
    vocab = {word: index for index, word in enumerate(words)}

    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix=" ", cleanup=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return TextTokenizer(tok, eos_token=EOS, pad_token=PAD, bos_token=BOS, unk_token=UNK)
