"""Score multi-task checkpoints on the dev sets and write CS224N prediction files; several checkpoints are
scored one by one and as an ensemble that averages their scores (class and paraphrase probabilities, similarities).

    python evaluate.py runs/minilm/best --data_dir ../shared/data [--plots]
    python evaluate.py runs/a/best runs/b/best runs/c/best --data_dir ../shared/data
"""
import argparse
import json
import sys
from pathlib import Path

from minbert.data import TASKS
from minbert.heads import MultitaskBert
from minbert.heads.export import export_sentence_transformer
from minbert.checkpoint import read_json
from minbert.errors import ConfigError, MinbertError
from minbert.runtime import AMP_CHOICES, resolve_device, resolve_precision
from minbert.training.config import DataOptions, TrainConfig
from minbert.training.evaluation import average, dev_metrics, labels_by_id, overall_formula, write_predictions
from minbert.training.plots import plot_predictions
from minbert.training.run_dir import refuse_run_folder


def format_table(rows: dict[str, dict]) -> str:
    """Markdown table: one row per model, one column per metric."""
    columns = list(next(iter(rows.values())))
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{m[c]:.4f}" for c in columns) + " |" for name, m in rows.items()]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="checkpoint directories written by train.py (e.g. runs/NAME/best); several = an ensemble")
    p.add_argument("--data_dir", default="data", help="folder holding the CS224N csv files and those of the tasks a "
                   "checkpoint defines (default: data)")
    p.add_argument("--output_dir", default="predictions", help="where the *-output.csv files go")
    for task in TASKS:
        for split in ("dev", "test"):
            p.add_argument(f"--{task}_{split}", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", nargs="?", const="bf16", default="auto", choices=AMP_CHOICES,
                   help="mixed precision: auto = bf16 on GPUs that have it, else fp16 on CUDA, float32 on the CPU")
    p.add_argument("--no-amp", dest="amp", action="store_const", const="off", help="float32 (same as --amp off)")
    p.add_argument("--plots", action="store_true", help="write confusion matrices and an STS residual plot (PNG)")
    p.add_argument("--export", metavar="DIR", default=None,
                   help="instead of scoring, write the checkpoint's encoder as a folder transformers and "
                        "sentence-transformers load (LoRA merged; PALs, the BiLSTM and cross-encoders refused)")
    args = p.parse_args(argv)
    for name in ("batch_size", "max_length"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


def evaluate_checkpoints(args: argparse.Namespace) -> dict:
    """Score every checkpoint and their ensemble, write the prediction files; returns the (ensemble's) metrics."""
    device = resolve_device(args.device)
    precision = resolve_precision(device, args.amp)
    data = DataOptions(args.data_dir, **{k: v for k, v in vars(args).items() if k.endswith(("_dev", "_test"))})
    for path in args.checkpoints:
        refuse_run_folder(Path(path))
    models = {path: MultitaskBert.from_checkpoint(path, device) for path in args.checkpoints}
    first = next(iter(models.values()))
    trained = [t for t in first.config.tasks if all(t in m.config.tasks for m in models.values())]
    merged = ["cfimdb"] if all(m.config.cfimdb_labels for m in models.values()) else []  # scored by the SST head
    specs = {t: first.task(t) for t in trained + merged}  # the checkpoints carry the definitions of their tasks
    for path, model in models.items():
        differ = [t for t, spec in specs.items() if model.task(t) != spec]
        if differ:
            raise ConfigError(f"{path} defines task(s) {', '.join(differ)} otherwise than {args.checkpoints[0]}: "
                              "an ensemble averages the scores of one task definition")
    dev_sets, test_sets = {t: data.read(spec, "dev", print) for t, spec in specs.items()}, {}
    for task, spec in specs.items():
        test_file = data.file(spec, "test")
        if test_file is not None and test_file.is_file():
            test_sets[task] = data.read(spec, "test", print)
        else:
            print(f"no test file for {task} ({test_file or 'none in its definition'}): skipping its test predictions")
    # every member predicts with its own tokenizer and pair encoding; an ensemble averages scores
    table, dev_scores, test_scores = {}, [], []
    scored = [specs[t] for t in trained]
    for path, model in models.items():
        dev = {t: model.encode(d, args.max_length) for t, d in dev_sets.items()}
        dev_scores.append({t: model.predict_scores(enc, args.batch_size, precision) for t, enc in dev.items()})
        test_scores.append({t: model.predict_scores(model.encode(d, args.max_length), args.batch_size, precision)
                            for t, d in test_sets.items()})
        table[path] = dev_metrics(dev, {t: labels_by_id(specs[t], s) for t, s in dev_scores[-1].items()}, scored)
    predictions = {t: labels_by_id(specs[t], average([s[t] for s in dev_scores])) for t in specs}
    metrics = dev_metrics(dev, predictions, scored)
    if len(models) > 1:
        table[f"ensemble of {len(models)}"] = metrics
    out_dir = Path(args.output_dir)
    for task, labels in predictions.items():
        write_predictions(out_dir, "dev", specs[task], labels)
    for task in test_sets:
        write_predictions(out_dir, "test", specs[task], labels_by_id(specs[task], average(
            [s[task] for s in test_scores])))
    if args.plots:
        for path in plot_predictions(dev, predictions, out_dir):
            print(f"wrote {path}")
    print(f"predictions in {out_dir}/")
    print(format_table(table))
    print(f"overall: {overall_formula(scored)}")
    print(json.dumps(metrics))
    return metrics


def export(args: argparse.Namespace) -> dict:
    """--export: the encoder of one checkpoint as a transformers + sentence-transformers folder."""
    if len(args.checkpoints) != 1:
        raise ConfigError("--export takes one checkpoint")
    checkpoint = Path(args.checkpoints[0])
    model = MultitaskBert.from_checkpoint(checkpoint)
    sets = checkpoint.resolve().parent  # a set of a run: RUN/checkpoints/step-N, whose options are RUN's
    options = sets.parent / "train_config.json"
    command = TrainConfig.from_dict(read_json(options)).command() if sets.name == "checkpoints" and \
        options.is_file() else None
    directory = export_sentence_transformer(model, args.export, metrics=MultitaskBert.checkpoint_metadata(checkpoint),
                                            command=command)
    print(f"wrote {directory}: load it with transformers.AutoModel.from_pretrained({str(directory)!r}) or "
          f"sentence_transformers.SentenceTransformer({str(directory)!r})")
    return {"export": str(directory)}


def main(argv=None) -> dict:
    """The command line: a one-line message and exit code 2 for a usage error, 1 for a bad file or checkpoint."""
    args = parse_args(argv)
    try:
        return export(args) if args.export else evaluate_checkpoints(args)
    except ConfigError as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except (MinbertError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
