"""WordPiece tokenizer on the `tokenizers` library, read from tokenizer.json or vocab.txt."""
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from .checkpoint import atomic_write, read_json, save_json
from .config import check_type
from .loading import TOKENIZER_FILES, CheckpointError, resolve_model_dir

OPTION_TYPES = {"do_lower_case": bool, "tokenize_chinese_chars": bool, "strip_accents": bool | None}


def read_options(config_file: Path) -> tuple[dict, dict[str, str]]:
    """tokenizer_config.json's options ({} without the file), their types checked, and the unk, cls, sep, pad and
    mask tokens it names (an AddedToken object by its content), else BERT's."""
    options = read_json(config_file) if config_file.is_file() else {}
    kinds = ("unk", "cls", "sep", "pad", "mask")
    tokens = {kind: options.get(f"{kind}_token") or f"[{kind.upper()}]" for kind in kinds}
    tokens = {kind: t.get("content") if isinstance(t, dict) else t for kind, t in tokens.items()}
    try:
        for name, annotation in OPTION_TYPES.items():
            if name in options:
                check_type(name, options[name], annotation)
        for kind, token in tokens.items():
            check_type(f"{kind}_token", token, str)
    except TypeError as err:
        raise CheckpointError(f"minbert: {config_file}: {err}") from None
    return options, tokens


def check_tokens(vocab: dict[str, int], tokens, file: Path) -> None:
    """Raise a CheckpointError naming `file` unless `vocab` holds all of `tokens`."""
    missing = [t for t in dict.fromkeys(tokens) if t not in vocab]
    if missing:
        raise CheckpointError(f"minbert: {file} has no {', '.join(map(repr, missing))} token"
                              f"{'s' if len(missing) > 1 else ''}; the file is truncated or from another tokenizer "
                              "(tokenizer_config.json can name its special tokens)")


def read_vocab(vocab_file: Path) -> dict[str, int]:
    """token -> id of a vocab.txt (one token a line); a byte that is not UTF-8 is a CheckpointError naming its line."""
    raw = vocab_file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise CheckpointError(f"minbert: {vocab_file} line {line}: byte 0x{raw[err.start]:02x} is not valid UTF-8; "
                              "re-save it as UTF-8 or re-download it") from None
    return {line.rstrip("\n"): i for i, line in enumerate(text.splitlines())}


def read_tokenizer_json(file: Path) -> Backend:
    """A tokenizer.json; one the `tokenizers` library cannot read is a CheckpointError naming it."""
    try:
        return Backend.from_file(str(file))
    except Exception as err:  # the library raises a bare Exception
        reason = str(err).partition("\n")[0]
        raise CheckpointError(f"minbert: {file} is not a readable tokenizer file ({reason}); re-create or "
                              "re-download it") from None


def wordpiece_from_vocab(vocab_file: Path, options: dict, tokens: dict[str, str]) -> Backend:
    """The BERT pipeline Hugging Face's BertTokenizerFast builds from a vocab.txt, with `tokens` as special tokens."""
    vocab = read_vocab(vocab_file)
    check_tokens(vocab, tokens.values(), vocab_file)
    backend = Backend(WordPiece(vocab, unk_token=tokens["unk"], max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=options.get("tokenize_chinese_chars", True),
        strip_accents=options.get("strip_accents"), lowercase=options.get("do_lower_case", True))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = tokens["cls"], tokens["sep"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    backend.decoder = decoders.WordPiece(prefix="##")
    return backend


class Tokenizer:
    """`tok(texts, pair_texts=None, max_length=512)` -> dict of LongTensors padded to the longest item."""

    def __init__(self, backend: Backend, pad_token: str = "[PAD]", mask_token: str = "[MASK]"):
        self.backend = backend
        self.backend.no_padding()
        self.backend.no_truncation()
        self.pad_token_id = self._id(pad_token)
        self.mask_token_id = self._id(mask_token)
        self.special_ids = sorted({self._id(t) for t in (pad_token, mask_token)} |
                                  {i for i in backend.encode("", "").ids})

    def _id(self, token: str) -> int:
        i = self.backend.token_to_id(token)
        if i is None:
            raise CheckpointError(f"minbert: the vocabulary has no {token!r} token")
        return i

    @classmethod
    def from_pretrained(cls, name_or_path: str, revision: str = "main") -> "Tokenizer":
        """tokenizer.json when present, else vocab.txt; lower-casing as tokenizer_config.json says. Names as for
        BertModel.from_pretrained (a Hub model at `revision` is downloaded when not cached)."""
        model_dir = resolve_model_dir(name_or_path, revision, needs=TOKENIZER_FILES)
        options, tokens = read_options(model_dir / "tokenizer_config.json")
        if (model_dir / "tokenizer.json").is_file():
            backend = read_tokenizer_json(model_dir / "tokenizer.json")
            check_tokens(backend.get_vocab(), [t for t in (getattr(backend.model, "unk_token", None), tokens["pad"],
                                                           tokens["mask"]) if t], model_dir / "tokenizer.json")
            norm = json.loads(backend.normalizer.__getstate__()) if backend.normalizer else {}
            if norm.get("type") == "BertNormalizer" and "do_lower_case" in options \
                    and norm["lowercase"] != options["do_lower_case"]:
                backend.normalizer = normalizers.BertNormalizer(
                    clean_text=norm["clean_text"], handle_chinese_chars=norm["handle_chinese_chars"],
                    strip_accents=norm["strip_accents"], lowercase=options["do_lower_case"])
        elif (model_dir / "vocab.txt").is_file():
            backend = wordpiece_from_vocab(model_dir / "vocab.txt", options, tokens)
        else:
            raise CheckpointError(f"minbert: {model_dir} has no tokenizer (looked for tokenizer.json or vocab.txt)")
        return cls(backend, tokens["pad"], tokens["mask"])

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, texts: list[str], pair_texts: list[str] | None = None,
               max_length: int = 512) -> tuple[list[list[int]], list[list[int]]]:
        """Unpadded input_ids and token_type_ids; pairs as [CLS] a [SEP] b [SEP], longest side truncated first."""
        if pair_texts is not None and len(pair_texts) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(pair_texts)} pair_texts")
        self.backend.enable_truncation(max_length, strategy="longest_first")
        inputs = list(texts) if pair_texts is None else list(zip(texts, pair_texts))
        encodings = self.backend.encode_batch(inputs)
        return [e.ids for e in encodings], [e.type_ids for e in encodings]

    def pad(self, input_ids: list[list[int]], token_type_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest item: input_ids, attention_mask, token_type_ids as (B, T) LongTensors."""
        B, T = len(input_ids), max(map(len, input_ids), default=0)
        out = {"input_ids": torch.full((B, T), self.pad_token_id, dtype=torch.long),
               "attention_mask": torch.zeros(B, T, dtype=torch.long),
               "token_type_ids": torch.zeros(B, T, dtype=torch.long)}
        for i, (ids, types) in enumerate(zip(input_ids, token_type_ids)):
            out["input_ids"][i, :len(ids)] = torch.tensor(ids)
            out["attention_mask"][i, :len(ids)] = 1
            out["token_type_ids"][i, :len(ids)] = torch.tensor(types)
        return out

    def __call__(self, texts: list[str] | str, pair_texts: list[str] | str | None = None,
                 max_length: int = 512) -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            texts, pair_texts = [texts], None if pair_texts is None else [pair_texts]
        return self.pad(*self.encode(texts, pair_texts, max_length))

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.backend.id_to_token(i) for i in ids]

    def normalizer_options(self) -> dict:
        """do_lower_case, strip_accents and tokenize_chinese_chars of a BertNormalizer (tokenizer_config.json
        names; transformers' BertTokenizer rebuilds its normaliser from them), else {}."""
        norm = json.loads(self.backend.normalizer.__getstate__()) if self.backend.normalizer else {}
        if norm.get("type") != "BertNormalizer":
            return {}
        return {"do_lower_case": norm["lowercase"], "strip_accents": norm["strip_accents"],
                "tokenize_chinese_chars": norm["handle_chinese_chars"]}

    def tokenizer_config(self, model_max_length: int | None = None) -> dict:
        """tokenizer_config.json as transformers' BertTokenizer reads it: class, normaliser options, special tokens
        and, when known, model_max_length."""
        cls, sep = self.backend.encode("").tokens  # a text alone is framed as [CLS] ... [SEP]
        config = {"tokenizer_class": "BertTokenizer", **self.normalizer_options(),
                  "unk_token": self.backend.model.unk_token, "sep_token": sep, "cls_token": cls,
                  "pad_token": self.backend.id_to_token(self.pad_token_id),
                  "mask_token": self.backend.id_to_token(self.mask_token_id)}
        return config if model_max_length is None else {**config, "model_max_length": model_max_length}

    def save(self, directory, model_max_length: int | None = None) -> None:
        """tokenizer.json (normaliser, vocabulary, templates) and tokenizer_config.json, atomically: what minbert
        checkpoints and transformers' fast tokenizers read."""
        directory = Path(directory)
        backend = Backend.from_str(self.backend.to_str())
        backend.no_truncation()  # `encode` sets the truncation per call; the file should not keep the last one
        atomic_write(directory / "tokenizer.json", lambda tmp: backend.save(str(tmp)))
        save_json(self.tokenizer_config(model_max_length), directory / "tokenizer_config.json")

    def save_pretrained(self, directory, model_max_length: int | None = None) -> None:
        """`save` plus vocab.txt: a folder transformers' AutoTokenizer, BertTokenizerFast and slow BertTokenizer
        load with this tokenizer's ids. `model_max_length` (the model's positions) is recorded when given."""
        self.save(directory, model_max_length)
        vocab = sorted(self.backend.get_vocab().items(), key=lambda item: item[1])  # [(token, id)] in id order
        atomic_write(Path(directory) / "vocab.txt",
                     lambda tmp: Path(tmp).write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8"))
