"""Throughput of minbert against transformers.BertModel (SDPA): same weights, same real CS224N batches.

Prints one table: inference and training-step tokens/s (non-padding tokens), their ratio, peak memory and, with
--mfu on CUDA, model FLOPs utilisation. See bench/README.md for what is measured and the caveats.
"""
import argparse
import datetime
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minbert
from minbert.data.readers import load_split
from minbert.loading import load_checked, minilm_dir, rename_keys

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
IMPLS = ("minbert", "transformers")
MODES = ("forward", "train")
SOURCES = (("sst", "texts"), ("para", "texts"), ("para", "pairs"), ("sts", "texts"), ("sts", "pairs"))


def sample_batches(data_dir: str, n: int, batch_size: int, seed: int) -> list[dict]:
    """n padded batches of random train sentences, cycling SST / Quora side 1 and 2 / STS side 1 and 2."""
    tok = minbert.Tokenizer.from_pretrained("minilm")  # bert-base-uncased vocabulary, shared by both models
    datasets = {task: load_split(data_dir, task, "train") for task in {t for t, _ in SOURCES}}
    rng = random.Random(seed)
    batches = []
    for k in range(n):
        task, side = SOURCES[k % len(SOURCES)]
        texts = getattr(datasets[task], side)
        batches.append(tok([texts[i] for i in rng.sample(range(len(texts)), batch_size)]))
    return batches


def build(name: str, seed: int) -> dict[str, torch.nn.Module]:
    """{'minbert': ..., 'transformers': ...} holding the same fp32 weights: MiniLM, or a seeded random bert-base."""
    if name == "minilm":
        theirs = transformers.BertModel.from_pretrained(minilm_dir(), attn_implementation="sdpa",
                                                        dtype=torch.float32)
        ours = minbert.BertModel.from_pretrained("minilm")
    elif name == "bert-base":
        torch.manual_seed(seed)
        theirs = transformers.BertModel(transformers.BertConfig(attn_implementation="sdpa"))
        ours = minbert.BertModel(minbert.BertConfig())
        load_checked(ours, rename_keys(theirs.state_dict()), Path("<random bert-base>"))
    else:
        raise SystemExit(f"unknown model {name!r} (choose from minilm, bert-base)")
    assert theirs.config._attn_implementation == "sdpa"
    return {"minbert": ours, "transformers": theirs}


def to_device(batches: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model: torch.nn.Module, mode: str, device: torch.device):
    """A function running one inference forward (eval, inference_mode) or one AdamW training step on a batch;
    bf16 autocast on CUDA, fp32 on CPU. The loss (mean of both outputs) is the same for both models."""
    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    if mode == "forward":
        model.eval()

        def step(batch):
            with torch.inference_mode(), autocast():
                model(**batch)
        return step
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)

    def step(batch):
        with autocast():
            out = model(**batch)
            loss = out["last_hidden_state"].float().mean() + out["pooler_output"].float().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def time_pass(step, batches: list[dict], device: torch.device) -> float:
    """Seconds for `step` on every batch once, synchronised with the device at both ends."""
    sync(device)
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    sync(device)
    return time.perf_counter() - start


def compare(steps: dict, batches: list[dict], device: torch.device, repeats: int, warmup: int) -> dict:
    """Warm up, then time the implementations alternately (order flipped every repeat); per-repeat seconds."""
    for _ in range(warmup):
        for step in steps.values():
            time_pass(step, batches, device)
    seconds = {impl: [] for impl in steps}
    for r in range(repeats):
        for impl in (list(steps) if r % 2 == 0 else list(reversed(steps))):
            seconds[impl].append(time_pass(steps[impl], batches, device))
    return seconds


def read_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_memory_mib(name: str, impl: str, mode: str, device: torch.device, batches: list[dict], seed: int) -> float:
    """Peak memory of one pass above the loaded model and batches: CUDA max_memory_allocated, CPU VmHWM - VmRSS
    (the high-water mark reset through /proc/self/clear_refs). Meant for a fresh process (see probe_memory)."""
    model = build(name, seed)[impl].to(device)
    batches = to_device(batches, device)
    gc.collect()
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        base = read_status_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    time_pass(make_step(model, mode, device), batches, device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else read_status_kib("VmHWM") * 1024
    return (peak - base) / 2**20


def probe_memory(args, name: str, impl: str, mode: str, device: torch.device) -> float | None:
    """Run peak_memory_mib in a fresh interpreter so earlier allocations cannot hide or inflate the peak."""
    command = [sys.executable, __file__, "--_probe", f"{name}:{impl}:{mode}:{device.type}",
               "--data_dir", args.data_dir, "--batches", str(args.batches), "--batch_size", str(args.batch_size),
               "--seed", str(args.seed), "--threads", str(torch.get_num_threads())]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"memory probe {name}/{impl}/{mode} failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def model_flops(model: minbert.BertModel, batches: list[dict], mode: str) -> float:
    """FLOPs of a pass, PaLM appendix B (Chowdhery et al. 2022): per token 6N + 12·L·d·T for training (N =
    encoder parameters without embeddings and pooler, T = the sequence's own length), a third of that forward."""
    n_params = sum(p.numel() for p in model.encoder.parameters())
    L, d = model.config.num_hidden_layers, model.config.hidden_size
    lengths = torch.cat([b["attention_mask"].sum(1) for b in batches]).double()
    forward = (2 * n_params * lengths + 4 * L * d * lengths ** 2).sum().item()
    return 3 * forward if mode == "train" else forward


def machine_info(devices: list[torch.device]) -> str:
    """CPU model, cores, threads, library versions, GPU, date: one line."""
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
               platform.processor() or "unknown CPU")
    gpu = [torch.cuda.get_device_name(d) for d in devices if d.type == "cuda"]
    return (f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
            + (f", GPU {gpu[0]}" if gpu else "")
            + f"; torch {torch.__version__}, transformers {transformers.__version__}"
            + f", Python {platform.python_version()}"
            + f"; {datetime.date.today().isoformat()}")


def render(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    """A Markdown table, or a plain one with aligned columns."""
    if markdown:
        lines = [header, ["---"] * len(header), *rows]
        return "\n".join("| " + " | ".join(r) + " |" for r in lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) if i > 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in [header, *rows])


def benchmark(args, device: torch.device, name: str, batches: list[dict]) -> list[list[str]]:
    """Table rows (forward, train) for one model on one device."""
    models = {impl: m.to(device) for impl, m in build(name, args.seed).items()}
    batches = to_device(batches, device)
    with torch.inference_mode():  # same weights => same outputs (fp32, eval) before anything is timed
        a, b = (models[impl].eval()(**batches[0])["last_hidden_state"] for impl in IMPLS)
        keep = batches[0]["attention_mask"].bool()
        diff = (a - b)[keep].abs().max().item()
    if diff > 1e-3:
        raise SystemExit(f"{name}: minbert and transformers disagree by {diff:.2e}; not the same weights?")
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    rows = []
    for mode in MODES:
        seconds = compare({impl: make_step(models[impl], mode, device) for impl in IMPLS},
                          batches, device, args.repeats, args.warmup)
        rate = {impl: statistics.median(tokens / s for s in seconds[impl]) for impl in IMPLS}
        ratios = [t / m for m, t in zip(seconds["minbert"], seconds["transformers"])]
        row = [device.type, name, mode, f"{rate['minbert']:,.0f}", f"{rate['transformers']:,.0f}",
               f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"]
        if not args.no_memory:
            peaks = [probe_memory(args, name, impl, mode, device) for impl in IMPLS]
            row += ["n/a" if p is None else f"{p:,.0f}" for p in peaks]
        if args.mfu:
            flops = model_flops(models["minbert"], batches, mode)
            row += [f"{100 * flops / statistics.median(seconds[impl]) / (args.peak_tflops * 1e12):.1f}%"
                    if device.type == "cuda" else "n/a" for impl in IMPLS]
        rows.append(row)
        print("# done:", "  ".join(row), file=sys.stderr, flush=True)  # progress; the table comes at the end
    del models
    gc.collect()
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"),
                   help="folder with ids-sst-train.csv, quora-train.csv, sts-train.csv (default ../shared/data)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                   help="auto = CPU, plus CUDA (bf16 autocast) when available")
    p.add_argument("--models", default="minilm,bert-base", help="comma-separated: minilm, bert-base")
    p.add_argument("--batches", type=int, default=10, help="distinct real batches per repeat")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="timed passes per implementation (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes per implementation first")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seeds the batch sample and the random bert-base")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table (for BENCHMARKS.md)")
    p.add_argument("--no_memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--mfu", action="store_true", help="add model FLOPs utilisation on CUDA")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="device peak for --mfu (H100 bf16 dense: 989)")
    p.add_argument("--_probe", help=argparse.SUPPRESS)  # internal: model:impl:mode:device, prints peak MiB
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    batches = sample_batches(args.data_dir, args.batches, args.batch_size, args.seed)
    if args._probe:
        name, impl, mode, device = args._probe.split(":")
        print(json.dumps(peak_memory_mib(name, impl, mode, torch.device(device), batches, args.seed)))
        return
    devices = [torch.device(d) for d in (["cpu", "cuda"] if args.device == "auto" else [args.device])
               if d == "cpu" or torch.cuda.is_available()]
    header = ["device", "model", "mode", "minbert tok/s", "transformers tok/s", "ratio (min-max)"]
    header += [] if args.no_memory else ["minbert peak MiB", "transformers peak MiB"]
    header += ["minbert MFU", "transformers MFU"] if args.mfu else []
    rows = [row for device in devices for name in args.models.split(",") for row in
            benchmark(args, device, name.strip(), batches)]
    lengths = torch.cat([b["attention_mask"].sum(1) for b in batches])
    padded = sum(b["input_ids"].numel() for b in batches)
    print(render(header, rows, args.markdown))
    print()
    sample = (f"{len(batches)} batches x {args.batch_size} sentences from SST/Quora/STS train (seed {args.seed}): "
              f"{int(lengths.sum())} tokens ({100 * lengths.sum().item() / padded:.0f}% of padded), length median "
              f"{int(lengths.median())}, max {int(lengths.max())}")
    notes = [sample, f"medians of {args.repeats} interleaved repeats after {args.warmup} warm-up",
             "ratio = minbert / transformers tokens/s per repeat, median (range)",
             "CPU fp32, CUDA bf16 autocast"]
    notes += [] if args.no_memory else ["peak = memory above loaded weights and batches, fresh process per cell"]
    notes += [f"MFU against {args.peak_tflops:g} TFLOP/s, PaLM FLOPs 6N + 12LdT per token"] if args.mfu else []
    print("; ".join(notes) + ".")
    print(f"Machine: {machine_info(devices)}")


if __name__ == "__main__":
    main()
