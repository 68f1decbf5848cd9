"""WordPiece tokenizer on the `tokenizers` library, read from tokenizer.json or vocab.txt."""
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from .checkpoint import atomic_write, save_json
from .loading import CheckpointError, resolve_model_dir


def wordpiece_from_vocab(vocab_file: Path, options: dict) -> Backend:
    """The BERT pipeline Hugging Face's BertTokenizerFast builds from a vocab.txt."""
    vocab = {line.rstrip("\n"): i for i, line in enumerate(vocab_file.read_text(encoding="utf-8").splitlines())}
    backend = Backend(WordPiece(vocab, unk_token=options.get("unk_token", "[UNK]"), max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=options.get("tokenize_chinese_chars", True),
        strip_accents=options.get("strip_accents"), lowercase=options.get("do_lower_case", True))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = options.get("cls_token", "[CLS]"), options.get("sep_token", "[SEP]")
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
    def from_pretrained(cls, name_or_path: str) -> "Tokenizer":
        """tokenizer.json when present, else vocab.txt; lower-casing as tokenizer_config.json says."""
        model_dir = resolve_model_dir(name_or_path)
        config_file = model_dir / "tokenizer_config.json"
        options = json.loads(config_file.read_text()) if config_file.is_file() else {}
        if (model_dir / "tokenizer.json").is_file():
            backend = Backend.from_file(str(model_dir / "tokenizer.json"))
            norm = json.loads(backend.normalizer.__getstate__()) if backend.normalizer else {}
            if norm.get("type") == "BertNormalizer" and "do_lower_case" in options \
                    and norm["lowercase"] != options["do_lower_case"]:
                backend.normalizer = normalizers.BertNormalizer(
                    clean_text=norm["clean_text"], handle_chinese_chars=norm["handle_chinese_chars"],
                    strip_accents=norm["strip_accents"], lowercase=options["do_lower_case"])
        elif (model_dir / "vocab.txt").is_file():
            backend = wordpiece_from_vocab(model_dir / "vocab.txt", options)
        else:
            raise CheckpointError(f"minbert: {model_dir} has no tokenizer (looked for tokenizer.json or vocab.txt)")
        return cls(backend, options.get("pad_token", "[PAD]"), options.get("mask_token", "[MASK]"))

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

    def save(self, directory) -> None:
        """tokenizer.json (normaliser, vocabulary, templates) and the special-token names, atomically."""
        directory = Path(directory)
        atomic_write(directory / "tokenizer.json", lambda tmp: self.backend.save(str(tmp)))
        save_json({"pad_token": self.backend.id_to_token(self.pad_token_id),
                   "mask_token": self.backend.id_to_token(self.mask_token_id)}, directory / "tokenizer_config.json")
