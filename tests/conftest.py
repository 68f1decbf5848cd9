"""Shared fixtures: tiny random configs and checkpoints the tests write themselves (no downloads)."""
import json
from pathlib import Path

import pytest
import torch

import minbert

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64, type_vocab_size=2, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)


@pytest.fixture
def tiny_config() -> minbert.BertConfig:
    return minbert.BertConfig(**TINY)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return minbert.loading.minilm_dir()


def random_batch(vocab_size: int, B: int = 3, T: int = 11, seed: int = 0) -> dict:
    """A padded batch: row lengths T, T-4, 1 and both token types."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab_size, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    for i, n in enumerate([T, T - 4, 1][:B]):
        attention_mask[i, n:] = 0
    input_ids[attention_mask == 0] = 0
    token_type_ids = (torch.arange(T) >= T // 2).long().expand(B, T) * attention_mask
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


WORDS = ["the", "a", "movie", "good", "bad", "is", "was", "what", "how", "why", "man", "dog", "cat", "plays",
         "guitar", "great", "awful", "film", "question", "same", "do", "i", "you", "it", "not", "very"]
VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz")
         + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"] + list("0123456789") + list(".,!?'-") + WORDS)
assert len(VOCAB) == TINY["vocab_size"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny BERT saved like a Hugging Face checkpoint, with a matching WordPiece vocab.txt."""
    directory = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    model = minbert.BertModel(minbert.BertConfig(**{**TINY, "hidden_dropout_prob": 0.1}))
    from safetensors.torch import save_file
    save_file(model.state_dict(), directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps({**TINY, "hidden_dropout_prob": 0.1}))
    (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return directory


def write_tsv(path: Path, header: list[str], rows: list[list]) -> None:
    path.write_text("\n".join("\t".join(map(str, r)) for r in [header, *rows]) + "\n")


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """CS224N-format train/dev/test files with a few dozen rows each (and the real files' header quirks)."""
    directory = tmp_path_factory.mktemp("tiny-data")
    g = torch.Generator().manual_seed(0)

    def sentence() -> str:
        return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(torch.randint(2, 9, (1,), generator=g)),),
                                                        generator=g).tolist())
    for split, n in (("train", 48), ("dev", 20)):
        write_tsv(directory / f"ids-sst-{split}.csv", ["", "id", "sentence", "sentiment"],
                  [[i, f"sst{split}{i}", " " + sentence(), i % 5] for i in range(n)])
        write_tsv(directory / f"quora-{split}.csv", ["", "id", "sentence1", "sentence2", "is_duplicate"],
                  [[i, f"q{split}{i}", sentence(), sentence(), f"{i % 2}.0"] for i in range(n)])
        write_tsv(directory / f"sts-{split}.csv", ["", "id", "sentence1", "sentence2", "similarity"],
                  [[i, f"s{split}{i}", sentence(), sentence(), round((i * 0.37) % 5, 2)] for i in range(n)])
    write_tsv(directory / "ids-sst-test-student.csv", ["0", "", "id", "sentence"],
              [[i + 1, f"{i}.0", f"sstt{i}", " " + sentence()] for i in range(10)])
    write_tsv(directory / "sts-test-student.csv", ["", "id", "sentence1", "sentence2"],
              [[i, f"stst{i}", sentence(), sentence()] for i in range(10)])
    return directory
