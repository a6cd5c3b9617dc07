"""Fine-tuning results as files: results.json, results.md, results.png, a copy of the pretrained model's
card with a section of results, and the fine-tuned model's own card with its scores as `model-index`
metadata (what the Hub shows)."""

from __future__ import annotations

import json
import math
from pathlib import Path

CARD_SECTION = "## Fine-tuning results"
# the pretrained model's card with this task's results, in the output directory: the model directory
# may be someone else's (a Hugging Face cache snapshot's files are links into a shared store)
PRETRAINED_CARD = "pretrained_model_card.md"
CARD_HEADER = "| task | split | metric | median | seeds | TF-IDF baseline |\n|---|---|---|---|---|---|"
PLOT = "results.png"
GLUE = "nyu-mll/glue"
METRIC_NAMES = {
    "accuracy": "Accuracy",
    "f1": "F1",
    "matthews_correlation": "Matthews correlation",
    "pearsonr": "Pearson r",
    "spearmanr": "Spearman r",
}


def _metric_label(result: dict) -> str:
    metrics = result["metrics"]
    return metrics[0] if len(metrics) == 1 else f"mean of {'/'.join(metrics)}"


def results_table(result: dict) -> str:
    """Markdown: one row per scored split, each seed's score, the median, the baseline's score and, when
    it was run, the median of the same architecture fine-tuned from random initialisation."""
    seeds, random_init = result["seeds"], result.get("random_init")
    head = ["task", "split", "metric", *(f"seed {run['seed']}" for run in seeds), "median", "TF-IDF baseline"]
    head += ["random init (median)"] if random_init else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for split in result["median"]:
        cells = [result["task"], split, _metric_label(result)]
        cells += [f"{run['scores'][split]['score']:.4f}" for run in seeds]
        cells += [f"**{result['median'][split]:.4f}**", _baseline_cell(result, split)]
        cells += [f"{random_init['median'][split]:.4f}"] if random_init else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_range(side: dict, split: str) -> str:
    """The lowest and highest seed score of one side (a results dict or its `random_init`) on `split`."""
    scores = [run["scores"][split]["score"] for run in side["seeds"]]
    return f"{min(scores):.4f}-{max(scores):.4f}"


def gain_over_random_init(result: dict, split: str) -> str:
    """How sure the gain of pretraining is on `split`, in words: the difference of the medians, and
    whether every seed of one side scores above every seed of the other (beyond the seed spread) or
    the two sides' seeds overlap (within it: another set of seeds could reverse the order)."""
    ours = [run["scores"][split]["score"] for run in result["seeds"]]
    scratch = [run["scores"][split]["score"] for run in result["random_init"]["seeds"]]
    gain = 100 * (result["median"][split] - result["random_init"]["median"][split])
    if min(ours) > max(scratch):
        verdict = "every pretrained seed scores above every random-init seed: beyond the seed spread"
    elif min(scratch) > max(ours):
        verdict = "every random-init seed scores above every pretrained seed: pretraining hurt"
    else:
        verdict = "the two sides' seeds overlap: within the seed spread, not a sure difference"
    ranges = f"{seed_range(result, split)} against {seed_range(result['random_init'], split)}"
    return f"pretraining {gain:+.1f} points at the median ({ranges}); {verdict}"


def _baseline_cell(result: dict, split: str) -> str:
    baseline = result.get("baseline")
    return "—" if baseline is None else f"{baseline['scores'][split]['score']:.4f}"


def lr_choice(result: dict) -> str:
    """The learning rate kept, and the grid's median validation scores it was chosen from."""
    grid = result["grid"]
    if len(grid) == 1:
        return f"lr {result['lr']:g}"
    tried = ", ".join(f"{entry['lr']:g} ({entry['validation_median']:.4f})" for entry in grid)
    return f"lr {result['lr']:g}, chosen by median validation score from {tried}"


def write_results(result: dict, out_dir: str | Path) -> None:
    """results.json, results.md and results.png in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    config = result["config"]
    lines = [
        f"# Fine-tuning {result['task']}",
        "",
        f"Model: `{result['model_dir']}` ({result['init']} weights); train {result['train_rows']} rows, "
        f"validation {result['validation_rows']} rows.",
        f"Protocol: {len(result['seeds'])} seeds, median reported; {lr_choice(result)}, "
        f"batch {config['batch_size']}, "
        f"up to {config['epochs']} epochs, early stopping patience {config['patience']}, "
        f"max length {config['max_length']}, precision {config['mixed_precision']}.",
    ]
    if result.get("baseline"):
        lines.append(f"Baseline: {result['baseline']['model']}.")
    if result.get("random_init"):
        lines.append(
            f"Random initialisation: the same architecture fine-tuned the same way, "
            f"{lr_choice(result['random_init'])}."
        )
    if result.get("saved_model"):
        saved = result["saved_model"]
        lines.append(
            f"Fine-tuned model: `{saved['path']}`, seed {saved['seed']} (the best of these on validation)."
        )
    lines += [f"Note: {note}." for note in result["notes"]]
    lines += ["", results_table(result), ""]
    if result.get("random_init"):
        lines += [f"{split}: {gain_over_random_init(result, split)}." for split in result["median"]] + [""]
    lines += [f"![scores per seed]({PLOT})", ""]
    (out_dir / "results.md").write_text("\n".join(lines))
    plot_results([result], out_dir / PLOT)


def plot_results(results: list[dict], out: Path) -> Path:
    """A PNG of each task and scored split: every seed's score as a point, their median as a bar, the
    TF-IDF baseline as a dashed line and, where it was run, random initialisation's seeds (hollow) and
    median (dotted line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [(result, split) for result in results for split in result["median"]]
    fig, ax = plt.subplots(figsize=(1.6 * len(columns) + 1.5, 4.0))
    labelled = set()

    def label(name: str) -> str | None:
        first = name not in labelled
        labelled.add(name)
        return name if first else None

    for x, (result, split) in enumerate(columns):
        scores = [run["scores"][split]["score"] for run in result["seeds"]]
        ax.scatter([x - 0.1] * len(scores), scores, color="C0", zorder=3, label=label("fine-tuned, per seed"))
        ax.hlines(
            result["median"][split], x - 0.2, x, color="C0", linewidth=2.5, label=label("fine-tuned, median")
        )
        if result.get("baseline"):
            score = result["baseline"]["scores"][split]["score"]
            ax.hlines(score, x - 0.4, x + 0.4, color="grey", linestyles="--", label=label("TF-IDF baseline"))
        if random_init := result.get("random_init"):
            scratch = [run["scores"][split]["score"] for run in random_init["seeds"]]
            ax.scatter(
                [x + 0.1] * len(scratch),
                scratch,
                facecolors="none",
                edgecolors="C1",
                zorder=3,
                label=label("random init, per seed"),
            )
            ax.hlines(
                random_init["median"][split],
                x - 0.4,
                x + 0.4,
                color="C1",
                linestyles=":",
                linewidth=2,
                label=label("random init, median"),
            )
    ax.set_xticks(range(len(columns)), [f"{result['task']}\n{split}" for result, split in columns])
    ax.set_xlim(-0.6, len(columns) - 0.4)
    metrics = sorted({_metric_label(result) for result in results})
    ax.set_ylabel(" / ".join(metrics))
    seeds = sorted({len(result["seeds"]) for result in results})
    ax.set_title(f"Fine-tuning: {', '.join(map(str, seeds))} seeds, median reported")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside: never over a point
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def finetuned_card(result: dict, repo_id: str | None = None) -> str:
    """The fine-tuned model's README.md: `model-index` metadata with the saved model's own scores on each
    scored split (the form the Hub displays), how to use it, and the table of every seed.

    The scores are those of the weights saved, the seed chosen on validation, not the median: a
    `model-index` entry describes the model it is in. `repo_id` names the model in the card and in the
    example (default: its directory).
    """
    from huggingface_hub import EvalResult, ModelCardData

    saved = result["saved_model"]
    run = next(run for run in result["seeds"] if run["seed"] == saved["seed"])
    where = repo_id or saved["path"]
    name = repo_id.split("/")[-1] if repo_id else f"{_base_name(result['model_dir'])}-{result['task']}"
    glue = result["source"] == GLUE
    dataset = (
        {
            "dataset_type": GLUE,
            "dataset_name": f"GLUE {result['task'].upper()}",
            "dataset_config": result["task"],
        }
        if glue
        else {"dataset_type": result["task"], "dataset_name": result["task"]}
    )
    evals = [
        EvalResult(
            task_type="text-classification",
            task_name="Text Classification",
            **dataset,
            dataset_split=split,
            metric_type=metric,
            metric_name=METRIC_NAMES.get(metric, metric),
            metric_value=round(run["scores"][split][metric], 4),
        )
        for split in result["median"]
        for metric in result["metrics"]
        if math.isfinite(run["scores"][split][metric])  # a correlation of constant predictions is NaN
    ]
    data = ModelCardData(
        model_name=name,
        library_name="transformers",
        pipeline_tag="text-classification",
        tags=["mlm-pretrain", "text-classification"],
        datasets=[GLUE] if glue else None,
        eval_results=evals or None,
    )
    init = "from random initialisation" if result["init"] == "random" else f"from `{result['model_dir']}`"
    return f"""---
{data.to_yaml()}
---
# {name}

A sequence classifier fine-tuned {init} on {result["task"]} with `mlm-pretrain finetune`:
{len(result["seeds"])} seeds, {lr_choice(result)}; these weights are seed {saved["seed"]}, the one with the
best validation score. The metadata above holds its scores; the table below every seed's and their median.

```python
from transformers import pipeline

classifier = pipeline("text-classification", model="{where}")
classifier("a text to classify", truncation=True)
```

## Results

{results_table(result)}

![scores per seed]({PLOT})
"""


def _base_name(model_dir: str) -> str:
    """A checkpoint's name: its directory's, or its run's for an export (`<run>/final`)."""
    path = Path(model_dir).resolve()
    return path.parent.name if path.name == "final" else path.name


def update_model_card(model_dir: str | Path, result: dict, out_dir: str | Path) -> Path:
    """`out_dir/PRETRAINED_CARD`: the card of `model_dir` (or a new one) with this task's rows added to or
    replaced in its "Fine-tuning results" section; other tasks' rows stay. `model_dir` is only read."""
    card = Path(model_dir) / "README.md"
    text = card.read_text() if card.is_file() else f"# {Path(model_dir).resolve().name}\n"
    before, _, rest = text.partition(CARD_SECTION)
    section, heading, after = rest.partition("\n## ")
    rows = [
        line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| task |")
    ]
    rows = [row for row in rows if row.split("|")[1].strip() != result["task"]]
    for split, median in result["median"].items():
        cells = [
            result["task"],
            split,
            _metric_label(result),
            f"{median:.4f}",
            str(len(result["seeds"])),
            _baseline_cell(result, split),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    new_section = (
        f"{CARD_SECTION}\n\nMedian over seeds of fine-tuning with `mlm-pretrain finetune` "
        f"(one hyper-parameter set for all tasks but the learning rate, chosen per task on validation), "
        f"beside a TF-IDF bag-of-words baseline.\n\n"
        f"{CARD_HEADER}\n" + "\n".join(rows) + "\n"
    )
    text = before.rstrip("\n") + "\n\n" + new_section + (f"\n## {after}" if heading else "")
    out = Path(out_dir) / PRETRAINED_CARD
    out.write_text(text)
    return out
