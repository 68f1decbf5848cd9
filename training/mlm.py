"""Masked-LM further pre-training (Devlin et al. 2019 recipe) on the train sentences of --mlm_data, writing a model
folder (config.json, model.safetensors with `bert.*` and `cls.predictions.*`, the tokenizer) that --model accepts.
Masked-token accuracy on held-out dev sentences is logged before and after each epoch."""
from __future__ import annotations

import json
import math
import os
from contextlib import suppress
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from minbert.data import EncodedTask, TaskStream, eval_batches
from minbert.data.masking import mask_tokens, masked_lm_accuracy
from minbert import BertForMaskedLM, Tokenizer
from minbert.checkpoint import atomic_write, save_json, save_tensors
from minbert.errors import ConfigError, MinbertError
from minbert.runtime import autocast
from minbert.optim import AdamW, LossScaler, NonFiniteLoss, lr_lambda, param_groups_for_weight_decay

from .config import TrainConfig
from .session import Session

MODEL_FILES = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json")  # what --model reads
HELDOUT_SENTENCES = 2000


def read_sentences(cfg: TrainConfig, session: Session, tok: Tokenizer, max_length: int) -> dict[str, EncodedTask]:
    """Every sentence (both sides of pairs) of the --mlm_data tasks, tokenized: train, and held-out dev."""
    sentences = {"train": [], "dev": []}
    for task in cfg.mlm.mlm_data.split(","):
        for split in sentences:
            data = cfg.data.read(cfg.task(task), split, session.log)
            sentences[split] += data.texts + (data.pairs or [])
    sentences["dev"] = sentences["dev"][:HELDOUT_SENTENCES]
    return {split: EncodedTask(f"mlm-{split}", [str(i) for i in range(len(texts))],
                               [tok.encode(texts, max_length=max_length)], None, False, tok.pad)
            for split, texts in sentences.items()}


def pretrain_mlm(cfg: TrainConfig) -> dict:
    """Train BertForMaskedLM on masked sentences; returns the last epoch's record (loss, held-out accuracy)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ConfigError("--option mlm runs in one process (it does not share work across torchrun ranks): start "
                          "it with python train.py")
    if cfg.run.resume:
        raise ConfigError("--option mlm cannot --resume; start it over with --overwrite")
    with Session.start(cfg, f"masked-LM pre-training on {cfg.mlm.mlm_data}", MODEL_FILES) as session:
        device, precision, run_dir = session.rt.device, session.rt.precision, session.run.path
        try:
            model = BertForMaskedLM.from_pretrained(cfg.model.model, hidden_dropout_prob=cfg.model.hidden_dropout_prob)
            model = model.to(device)
            tok = Tokenizer.from_pretrained(cfg.model.model)
            encoded = read_sentences(cfg, session, tok, min(cfg.model.max_length, model.config.max_position_embeddings))
            stream = TaskStream(encoded["train"], cfg.loop.batch_size, seed=cfg.run.seed, bucket=cfg.data.bucket)
            steps_per_epoch = cfg.loop.steps_per_epoch or stream.batches_per_pass
            total = steps_per_epoch * cfg.loop.epochs
            optimizer = AdamW(param_groups_for_weight_decay(model, cfg.optim.weight_decay), lr=cfg.optim.lr)
            lr_sched = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lr_lambda(cfg.optim.lr_schedule, cfg.optim.warmup_steps(total), total))
            session.log(f"{len(encoded['train'])} sentences | {cfg.loop.epochs} epoch(s) x {steps_per_epoch} steps")

            def masked(batch: dict, generator: torch.Generator) -> tuple[dict, torch.Tensor]:
                ids, labels = mask_tokens(batch["input_ids"], batch["attention_mask"], tok.special_ids,
                                          tok.mask_token_id, tok.vocab_size, cfg.mlm.mlm_probability, generator)
                return {"input_ids": ids.to(device), "attention_mask": batch["attention_mask"].to(device),
                        "token_type_ids": batch["token_type_ids"].to(device)}, labels.to(device)

            @torch.inference_mode()
            def heldout_accuracy() -> float:
                """Accuracy on the same masked dev positions every time (a fixed masking seed)."""
                model.eval()
                generator, correct, total = torch.Generator().manual_seed(0), 0, 0
                for batch in eval_batches(encoded["dev"], cfg.loop.eval_batch_size):
                    inputs, labels = masked(batch, generator)
                    with autocast(device, precision):
                        c, n = masked_lm_accuracy(model(**inputs), labels)
                    correct, total = correct + c, total + n
                return correct / max(total, 1)

            history = [{"epoch": 0, "masked_token_accuracy": heldout_accuracy()}]
            session.log(f"held-out masked-token accuracy before: {history[0]['masked_token_accuracy']:.4f}")
            mask_generator = torch.Generator().manual_seed(cfg.run.seed)
            scaler = LossScaler(enabled=precision == "fp16")
            params = [p for p in model.parameters() if p.requires_grad]
            for epoch in range(cfg.loop.epochs):
                model.train()
                for _ in tqdm(range(steps_per_epoch), desc=f"mlm epoch {epoch + 1}/{cfg.loop.epochs}",
                              dynamic_ncols=True):
                    inputs, labels = masked(next(stream), mask_generator)
                    optimizer.zero_grad(set_to_none=True)
                    with autocast(device, precision):
                        logits = model(**inputs)  # (B, T, V)
                    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
                    scaler.scale(loss).backward()
                    found_inf = torch.zeros(1, device=device)
                    scaler.unscale_(params, found_inf)
                    loss_value, overflow = torch.stack([loss.detach(), found_inf[0]]).tolist()
                    problems = ([] if math.isfinite(loss_value) else [f"the masked-LM loss is {loss_value}"]) + \
                        (["a gradient is inf or NaN"] if overflow else [])
                    try:
                        if not scaler.check(problems):  # fp16: a skipped step
                            continue
                    except NonFiniteLoss as err:
                        raise MinbertError(f"{err} at epoch {epoch + 1}; try a lower --lr") from None
                    if cfg.optim.grad_clip:
                        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
                    optimizer.step()
                    lr_sched.step()
                history.append({"epoch": epoch + 1, "loss": loss.item(), "masked_token_accuracy": heldout_accuracy(),
                                **({"loss_scale": scaler.scale_value, "skipped_steps": scaler.skipped}
                                   if scaler.enabled else {})})
                save_model(model, tok, run_dir, epoch + 1)
                atomic_write(run_dir / "metrics.jsonl",
                             lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in history)))
                session.log(f"epoch {epoch + 1}: held-out masked-token accuracy "
                            f"{history[-1]['masked_token_accuracy']:.4f}")
            session.log(f"fine-tune it with: python train.py --model {run_dir} --data_dir {cfg.data.data_dir}")
            return history[-1]
        except MinbertError as err:
            with suppress(MinbertError):  # the log keeps it unless the disk is full
                session.log(f"error: {err}", echo=False)
            raise


def save_model(model: BertForMaskedLM, tok: Tokenizer, directory: Path, epoch: int) -> None:
    """A Hugging Face-style BertForMaskedLM folder: weights, config.json and the tokenizer, each atomically."""
    save_tensors(model.state_dict(), directory / "model.safetensors", {"epoch": str(epoch)})
    save_json({**model.config.to_dict(), "model_type": "bert", "architectures": ["BertForMaskedLM"]},
              directory / "config.json")
    tok.save(directory)
