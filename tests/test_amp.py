"""bf16 autocast, the CUDA default, exercised on the CPU: parity with transformers under the same autocast,
gradients close to float32, and train.py --amp end to end."""
import json

import pytest
import torch
import transformers

import minbert
import minbert.training.train as train
from conftest import TINY, random_batch
from minbert.heads import HeadConfig, MultitaskBert

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("unpad", [True, False])
def test_autocast_forward_matches_transformers_under_autocast(implementation, unpad):
    torch.manual_seed(0)
    hf = transformers.BertModel(transformers.BertConfig(**TINY, attn_implementation=implementation)).eval()
    ours = minbert.BertModel(minbert.BertConfig(**TINY, attn_implementation=implementation, unpad=unpad)).eval()
    ours.load_state_dict({k: v for k, v in hf.state_dict().items() if k in ours.state_dict()})
    batch = random_batch(TINY["vocab_size"], B=3, T=11)
    batch["attention_mask"][2] = 0  # an all-padding row must stay finite
    with torch.no_grad():
        full = ours(**batch)["last_hidden_state"]
        with torch.autocast(**BF16):
            mine, theirs = ours(**batch), hf(**batch)
    keep = batch["attention_mask"].bool()
    assert torch.isfinite(mine["last_hidden_state"]).all() and torch.isfinite(mine["pooler_output"]).all()
    torch.testing.assert_close(mine["last_hidden_state"].float()[keep], theirs.last_hidden_state.float()[keep],
                               atol=3e-2, rtol=0)
    torch.testing.assert_close(mine["pooler_output"].float()[:2], theirs.pooler_output.float()[:2], atol=3e-2, rtol=0)
    assert (mine["last_hidden_state"].float() - full)[keep].abs().max() > 0  # autocast really changed the math


def test_autocast_gradients_are_close_to_float32(tiny_model_dir):
    torch.manual_seed(0)
    model = MultitaskBert.from_pretrained(tiny_model_dir, HeadConfig(tasks=["sst"], dropout=0.0),
                                         hidden_dropout_prob=0.0)
    batch = random_batch(TINY["vocab_size"], B=3, T=11)
    batch["labels"] = torch.tensor([0, 2, 4])
    grads = []
    for amp in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast(**BF16, enabled=amp):
            loss = model.loss("sst", batch)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.999
    assert not torch.equal(grads[0], grads[1])


def test_train_with_amp_on_cpu(tiny_model_dir, tiny_data_dir, tmp_path):
    metrics = train.main(["--model", str(tiny_model_dir), "--data_dir", str(tiny_data_dir), "--epochs", "1",
                          "--steps_per_epoch", "3", "--batch_size", "6", "--amp", "--output_dir", str(tmp_path)])
    assert json.loads((tmp_path / "train_config.json").read_text())["run"]["amp"] == "bf16"  # a bare --amp
    assert "device cpu (bf16 autocast) x 1 process(es)" in (tmp_path / "run.log").read_text()
    assert "overall" in metrics and all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert train.parse_args(["--device", "cpu"]).run.amp == "auto"  # resolved per device: float32 on the CPU
