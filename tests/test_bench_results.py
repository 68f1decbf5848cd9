"""bench/results.py: stored runs whose row changed since they ran are refused; a run's time is its whole training."""
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_results", ROOT / "bench" / "results.py")
results = importlib.util.module_from_spec(spec)
sys.modules["bench_results"] = results  # dataclasses look their module up there
spec.loader.exec_module(results)


def stored(row_name: str, seed: int = 11711, data_dir: str = "../shared/data") -> dict:
    row = next(r for r in results.ROWS if r.name == row_name)
    return {"row": row_name, "seed": seed, "command": " ".join(row.command(data_dir, seed)), "train_seconds": 1.0,
            **{m: 0.5 for m in results.METRICS}}


def test_committed_runs_match_their_rows():
    results.check_commands(results.read_jsonl(results.OUT / "runs.jsonl"))


def test_runs_with_their_rows_command_pass_whatever_the_data_dir():
    results.check_commands([stored("summed"), stored("PCGrad", 11712, "/data/cs224n"),
                            {"row": results.ENSEMBLE, "seed": None, "command": "python evaluate.py a b c"}])


def test_run_whose_row_changed_is_refused_with_its_line():
    changed = stored("annealed")
    changed["command"] = changed["command"].replace("--epochs 3 --steps_per_epoch 150",
                                                    "--epochs 1 --steps_per_epoch 450")
    with pytest.raises(SystemExit, match=r"runs.jsonl line 2: annealed seed 11711 ran .*--epochs 1 .* but the row "
                                         r"now runs .*--epochs 3 .*; remove the line and "
                                         r"bench/results/runs/annealed/seed11711/"):
        results.check_commands([stored("summed"), changed])


def test_run_of_a_row_that_no_longer_exists_is_refused():
    gone = dict(stored("summed"), row="summed, old name")
    with pytest.raises(SystemExit, match="line 1: no row is named 'summed, old name' any more"):
        results.check_commands([gone])


def test_row_keys_are_unique_folder_names():
    keys = [r.key for r in results.ROWS]
    assert len(set(keys)) == len(keys)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", k) for k in keys)
    named = {r.name: r.key for r in results.ROWS}
    assert named["sequential sst,para,sts"] == "sequential_sst-para-sts"
    assert named["sts cosine, rescaled loss"] == "sts_cosine-rescaled_loss"
    assert named["PALs pal shared V_E/V_D"] == "PALs_pal_shared_V_E_V_D"


def test_recipe_variants_are_their_recipes_on_mean_pooling_and_are_not_picked_as_recipes():
    """Projects 002 and 003's recipes less `--pooling pooler`, all else equal; the one-pass recipe is picked among
    the reports' own recipes only."""
    named = {r.name: r for r in results.ROWS}
    recipe_families = next(families for what, families, _ in results.PICKS if "recipe" in what)
    for n in ("002", "003"):
        recipe, variant = named[f"project {n}"], named[f"project {n}, mean pooling"]
        command = recipe.command_text("../shared/data", 11711).replace("--pooling pooler ", "")
        assert variant.command_text("../shared/data", 11711) == command.replace(f"project_{n}/",
                                                                                 f"project_{n}-mean_pooling/")
        assert "--pooling" not in variant.flags and variant.family not in recipe_families


def test_unknown_rows_key_is_refused_before_anything_runs(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["results.py", "--rows", "summed,PCgrad"])
    with pytest.raises(SystemExit, match="unknown --rows key.s. PCgrad; the keys are: summed, PCGrad, GradNorm"):
        results.main()


def test_finished_run_reports_the_whole_runs_training_seconds(tmp_path):
    """metrics.jsonl counts seconds since the evaluation before; a 3-epoch run's time is the sum of its records."""
    (tmp_path / "train_config.json").write_text(json.dumps({"loop": {"epochs": 3}}))
    records = [{"epoch": e, "sst_acc": 0.1 * e, "train_seconds": s} for e, s in ((1, 140.2), (2, 143.6), (3, 152.1))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert results.finished(tmp_path) == {"epoch": 3, "sst_acc": 0.1 * 3, "train_seconds": 435.9}
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    assert results.finished(tmp_path) is None  # stopped before its last epoch: resumed, not read back


def test_row_with_missing_seeds_says_how_many_it_has(tmp_path, monkeypatch):
    """The table claims 3 seeds per row; a row part-way through names its count instead of passing as complete."""
    monkeypatch.setattr(results, "ROOT", tmp_path)
    monkeypatch.setattr(results, "OUT", tmp_path)
    runs = [stored("summed", s) for s in results.SEEDS] + [stored("PCGrad", s) for s in results.SEEDS[:2]]
    results.write_table(runs)
    table = {line.split(" | ")[1]: line for line in (tmp_path / "RESULTS.md").read_text().splitlines()
             if line.startswith("| ") and " | " in line}
    assert "summed" in table and "PCGrad (2 of 3 seeds so far)" in table and "PCGrad" not in table
    assert "| GradNorm | 0.0001 | pending |" in table["GradNorm"]


def test_what_helps_sorts_rows_by_the_same_test_as_the_stars(tmp_path, monkeypatch):
    """Higher / equal / lower overall land in better / no different / worse; a gain on one task only is named."""
    monkeypatch.setattr(results, "ROOT", tmp_path)
    monkeypatch.setattr(results, "OUT", tmp_path)

    def runs(name, overall, sst=None, seeds=results.SEEDS):
        return [dict(stored(name, s), overall=o, sst_acc=(sst or overall)[i]) for i, (s, o) in
                enumerate(zip(seeds, overall))]
    base = [0.70, 0.71, 0.72]
    table = (runs("summed", base) + runs("PCGrad", [0.80, 0.81, 0.82]) + runs("GradNorm", [0.71, 0.70, 0.72])
             + runs("SMART", [0.60, 0.61, 0.62]) + runs("random", base, sst=[0.90, 0.91, 0.92])
             + runs("cls", [0.99, 0.99], seeds=results.SEEDS[:2]))
    results.write_table(table)
    text = (tmp_path / "RESULTS.md").read_text()
    section = dict(line[2:].split(": ", 1) for line in text.split("## What helps")[1].splitlines()
                   if line.startswith("- "))
    assert section["Better overall"] == "PCGrad (0.810)."
    assert section["No different overall"] == "GradNorm (0.710), random (0.710)."
    assert section["Worse overall"] == "SMART (0.610)."
    assert section["Better on a task, not overall"] == "random (SST acc 0.910 against 0.710)."
    assert "cls" not in text.split("## What helps")[1].split("\n## ")[0]  # 2 of 3 seeds: not read out yet
    assert "| PCGrad | 0.0001 | 0.810 ± 0.010 * |" in text  # the same test marks the table


def test_a_row_that_scores_as_summed_to_the_last_digit_at_every_seed_is_named(tmp_path, monkeypatch):
    """Equal per-seed metrics are named; the same values under other seeds, or one metric off by 1e-12, are not."""
    monkeypatch.setattr(results, "ROOT", tmp_path)
    monkeypatch.setattr(results, "OUT", tmp_path)

    def runs(name, overall, seeds=results.SEEDS, sts=0.5):
        return [dict(stored(name, s), overall=o, sts_pearson=sts) for s, o in zip(seeds, overall)]
    base = [0.70, 0.71, 0.72]
    table = (runs("summed", base) + runs("DualProj", base) + runs("GradVac", base, seeds=results.SEEDS[::-1])
             + runs("UW", base, sts=0.5 + 1e-12))
    results.write_table(table)
    helps = (tmp_path / "RESULTS.md").read_text().split("## What helps")[1].split("\n## ")[0]
    assert "- Scored exactly as summed at every seed, every metric to the last digit: DualProj.\n" in helps
    results.write_table(runs("summed", base) + runs("UW", base, sts=0.5 + 1e-12))
    assert "exactly as summed" not in (tmp_path / "RESULTS.md").read_text()


def test_the_longer_budget_is_tested_against_its_own_summed_row_and_scored_from_best(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "ROOT", tmp_path)
    monkeypatch.setattr(results, "OUT", tmp_path)

    def runs(name, overall):
        return [dict(stored(name, s), overall=o) for s, o in zip(results.SEEDS, overall)]
    table = runs("summed", [0.70, 0.71, 0.72]) + runs("summed, one pass", [0.80, 0.81, 0.82]) + runs(
        "PCGrad, one pass", [0.80, 0.80, 0.82])  # above the table's summed, not above its own budget's
    results.write_table(table + runs("PCGrad", [0.80, 0.81, 0.82]))
    budgets = (tmp_path / "RESULTS.md").read_text().split("## What changes with the budget")[1].split("\n## ")[0]
    assert "| none (summed) | 0.710 | 0.810 |" in budgets  # the same flags at both budgets, side by side
    assert "| `--pcgrad` | 0.810 (+0.100 *) | 0.807 (-0.003) |" in budgets  # a gain at one budget, none at the other
    assert "| `--hidden_dropout_prob 0.1` | not run | pending |" in budgets
    results.write_table(table)
    text = (tmp_path / "RESULTS.md").read_text()
    assert results.rows_of("one pass", {})[0].name == "summed, one pass"
    assert "| PCGrad, one pass | 0.0001 | " + "0.500 ± 0.000 | " * 3 + "0.807 ± 0.012 |" in text  # no *
    heading = "### What helps: a longer budget: one pass over the largest training set"
    section = dict(line[2:].split(": ", 1) for line in text.split(heading)[1].split("## ")[0].splitlines()
                   if line.startswith("- "))
    assert section["No different overall"] == "PCGrad, one pass (0.807)."
    assert section["Overall 0.760 or more, the goal of this budget"] == (
        "summed, one pass (0.810), PCGrad, one pass (0.807) (so far: 2 rows complete).")
    (tmp_path / "train_config.json").write_text(json.dumps({"loop": {"epochs": 3}}))
    records = [{"epoch": e, "overall": o, "train_seconds": 1.0} for e, o in ((1, 0.70), (2, 0.75), (3, 0.74))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert results.finished(tmp_path, best=True)["epoch"] == 2 and results.finished(tmp_path)["epoch"] == 3


def test_a_single_task_row_trains_each_task_alone_and_combines_their_metrics(tmp_path, monkeypatch):
    """C14's baseline: three train.py runs per seed (--tasks sst / para / sts, each 150 steps of 32: the examples
    summed training gives each task); each task's metric comes from its own run, overall by CS224N's formula."""
    monkeypatch.setattr(results, "ROOT", tmp_path)
    row = next(r for r in results.ROWS if r.single_task)
    ran = []

    def fake_run(command, log):  # what train.py leaves: its options and one evaluation
        out = tmp_path / command[command.index("--output_dir") + 1]
        task = command[command.index("--tasks") + 1]
        out.mkdir(parents=True)
        (out / "train_config.json").write_text(json.dumps({"loop": {"epochs": 1}}))
        value = {"sst": 0.4, "para": 0.8, "sts": 0.6}[task]
        (out / "metrics.jsonl").write_text(json.dumps({"epoch": 1, results.TASK_METRIC[task]: value,
                                                       "overall": value, "train_seconds": 10.0}) + "\n")
        ran.append((task, command[command.index("--steps_per_epoch") + 1]))
    monkeypatch.setattr(results, "run", fake_run)
    figures = results.run_row(row, 11711, "../shared/data")
    assert ran == [("sst", "150"), ("para", "150"), ("sts", "150")]
    assert figures["sst_acc"] == 0.4 and figures["para_acc"] == 0.8 and figures["sts_pearson"] == 0.6
    assert figures["overall"] == pytest.approx((0.4 + 0.8 + 0.8) / 3) and figures["train_seconds"] == 30.0
    assert figures["command"].count(" && ") == 2 and "--tasks sts" in figures["command"]
    results.check_commands([figures])  # what runs.jsonl stores is what the row runs
    assert results.run_row(row, 11711, "../shared/data") == figures and len(ran) == 3  # read back, not rerun


def test_claims_name_rows_of_the_table_and_get_their_verdict_from_its_test(tmp_path, monkeypatch):
    names = {r.name for r in results.ROWS}
    assert all(c.row in names and c.against in names and c.metric in results.METRICS for c in results.CLAIMS)
    monkeypatch.setattr(results, "ROOT", tmp_path)
    monkeypatch.setattr(results, "OUT", tmp_path)

    def runs(name, overall):
        return [dict(stored(name, s), overall=o) for s, o in zip(results.SEEDS, overall)]
    table = (runs("summed", [0.70, 0.71, 0.72]) + runs("PCGrad", [0.80, 0.81, 0.82])  # C5: better, as claimed
             + runs("frozen encoder (C16)", [0.70, 0.72, 0.71])  # C16 claims far worse: no difference here
             + runs("cosine LR (C18)", [0.60, 0.61, 0.62])  # C18 claims no difference: worse here
             + runs("LoRA r4 α8 fm as project 002 (C6)", [0.71, 0.70, 0.72]))  # C6: no difference, as claimed
    results.write_table(table)
    verdicts = {(line.split(" | ")[0][2:], line.split(" | ")[4]): line.rsplit(" | ", 1)[1].rstrip(" |")
                for line in (tmp_path / "RESULTS.md").read_text().split("claims, tested")[1].splitlines()
                if line.startswith("| C")}
    assert verdicts[("C5", "PCGrad against summed")] == "holds"
    assert verdicts[("C16", "frozen encoder (C16) against summed")] == "not at this budget"
    assert verdicts[("C18", "cosine LR (C18) against summed")] == "contradicted: worse"
    assert verdicts[("C6", "LoRA r4 α8 fm as project 002 (C6) against summed")] == "holds"
    assert verdicts[("C1", "summed against sts concat (C1)")] == "pending"


def test_a_table_of_sts_alone_shows_only_its_metrics(tmp_path, monkeypatch):
    """Its readout is against its own first row, which can also be its best."""
    monkeypatch.setattr(results, "ROOT", tmp_path)
    monkeypatch.setattr(results, "OUT", tmp_path)

    def table(bi: list[float], cross: list[float]) -> list[dict]:
        return [{"row": name, "seed": s, "command": results.row_named(name).command_text("../shared/data", s),
                 "train_seconds": 1.0, "sts_pearson": r, "overall": (r + 1) / 2}
                for name, values in (("STS alone, bi-encoder", bi), ("STS alone, cross-encoder", cross))
                for s, r in zip(results.SEEDS, values)]

    def section() -> str:
        text = (tmp_path / "RESULTS.md").read_text()
        return text.split("### What helps: cross- against bi-encoding on sts alone")[1].split("\n## ")[0]
    results.write_table(table([0.80, 0.81, 0.82], [0.86, 0.87, 0.88]))
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| STS alone, cross-encoder | 0.0001 | — | — | 0.870 ± 0.010 * | 0.935 ± 0.005 * |" in text
    assert "- Better overall: STS alone, cross-encoder (0.935)." in section()
    assert "against STS alone, bi-encoder, p < 0.05" in section() and "summed" not in section()
    results.write_table(table([0.86, 0.87, 0.88], [0.80, 0.81, 0.82]))
    assert "- Worse overall: STS alone, cross-encoder (0.905)." in section()
    assert "- Highest overall mean of a single model: STS alone, bi-encoder (0.935)." in section()


def test_the_one_pass_table_picks_its_last_rows_from_the_first_tables_figures(tmp_path, monkeypatch):
    """The two best aggregators or weightings and the best recipe join the one-pass table (and the queue, after the
    rows before them) once every candidate has all its seeds; until then the table names what is still to pick."""
    monkeypatch.setattr(results, "ROOT", tmp_path)
    monkeypatch.setattr(results, "OUT", tmp_path)
    candidates = [r for r in results.ROWS if r.budget == "standard" and r.family in ("gradient aggregation",
                                                                                     "task weighting")]
    overall = {r.name: 0.70 + 0.001 * i for i, r in enumerate(candidates)}
    overall.update({"UW": 0.76, "CAGrad": 0.75, "Nash-MTL": 0.74})  # UW, then CAGrad: the two best
    table = [dict(stored(name, s), overall=o) for name, o in overall.items() for s in results.SEEDS]
    del table[-1]  # the last candidate's third seed is missing: nothing is picked yet
    assert results.picked_rows(results.group(table, "row")) == ([], [what for what, _, _ in results.PICKS])
    results.write_table(table)
    assert ("| | the two best aggregators or loss weightings, one pass | | pending: picked by overall mean when the "
            "first table has all their seeds |") in (tmp_path / "RESULTS.md").read_text()

    table.append(dict(stored(candidates[-1].name, results.SEEDS[-1]), overall=overall[candidates[-1].name]))
    picked, waiting = results.picked_rows(results.group(table, "row"))
    assert [r.name for r in picked] == ["UW, one pass", "CAGrad, one pass"] and waiting == ["the best headline recipe"]
    assert picked[1].flags == ("--aggregator", "cagrad") and (picked[1].budget, picked[1].epochs) == ("one pass", 3)
    assert "--epochs 3 --steps_per_epoch 236" in picked[1].command_text("../shared/data", 11711)
    results.write_table(table)
    text = (tmp_path / "RESULTS.md").read_text().split("## A longer budget")[1].split("\n## ")[0]
    assert "| task weighting | UW, one pass | 0.0001 | pending |" in text
    assert "the two best aggregators" not in text and "the best headline recipe, one pass" in text
    queue = [results.next_to_run(table, [key], set()) for key in ("UW-one_pass", "PALs_pal-one_pass")]
    assert [(row.name, seed) for row, seed in queue] == [("UW, one pass", 11711), ("PALs pal, one pass", 11711)]
    results.check_commands(table + [dict(stored("summed"), row="UW, one pass",
                                         command=picked[0].command_text("../shared/data", 11711))])
