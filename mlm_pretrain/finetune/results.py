"""Fine-tuning results as files: results.json, results.md, and a section of the model card."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

CARD_SECTION = "## Fine-tuning results"
CARD_HEADER = "| task | split | metric | median | seeds | TF-IDF baseline |\n|---|---|---|---|---|---|"


def _metric_label(result: dict) -> str:
    metrics = result["metrics"]
    return metrics[0] if len(metrics) == 1 else f"mean of {'/'.join(metrics)}"


def results_table(result: dict) -> str:
    """Markdown: one row per scored split, each seed's score, the median and the baseline's score."""
    seeds = result["seeds"]
    head = ["task", "split", "metric", *(f"seed {run['seed']}" for run in seeds), "median", "TF-IDF baseline"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for split in result["median"]:
        cells = [result["task"], split, _metric_label(result)]
        cells += [f"{run['scores'][split]['score']:.4f}" for run in seeds]
        cells += [f"**{result['median'][split]:.4f}**", _baseline_cell(result, split)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    lines += [f"Note: {note}." for note in result["notes"]]
    lines += ["", results_table(result), ""]
    (out_dir / "results.md").write_text("\n".join(lines))


def update_model_card(model_dir: str | Path, result: dict) -> None:
    """Add or replace this task's rows in the card's "Fine-tuning results" section (creating the card
    or the section if absent); other tasks' rows stay."""
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
    try:
        card.write_text(text)
    except OSError as err:  # a read-only checkpoint (e.g. in a cache) still fine-tunes
        log.warning("could not update the model card %s: %s", card, err)
