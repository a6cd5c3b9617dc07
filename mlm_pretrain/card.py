"""The model card (README.md) of every directory we write or push, and the recipe as an export records it.

One writer, `card`, renders the front matter and the sections; `run_card` says what a run trained
(any objective), `hub_card` is the short card a push adds to a directory that has none.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from mlm_pretrain import __version__


def card(title: str, front_matter: dict, sections: dict[str, str], intro: str) -> str:
    """A model card: YAML front matter (the Hub reads library, pipeline and tags there), a title, an
    introduction and one `## heading` per section."""
    head = yaml.safe_dump(front_matter, sort_keys=False, default_flow_style=None).strip()
    body = "".join(f"\n## {heading}\n{text.strip()}\n" for heading, text in sections.items())
    return f"---\n{head}\n---\n# {title}\n\n{intro.strip()}\n{body}"


def run_card(recipe: dict, metrics: dict, steps: int, tokens: int) -> str:
    """The card of a run's export: what was trained, on what, how to load it, its final scores, and
    the recipe (`recipe` as `portable_recipe` gives it)."""
    objective = recipe["objective"]
    data = recipe["data"]
    corpus = ", ".join(str(s if isinstance(s, str) else s.get("path")) for s in data["corpus"])
    rows = "\n".join(
        f"| {k.removeprefix('eval_').replace('_', ' ')} | {f'{v:.4f}' if isinstance(v, float) else v} |"
        for k, v in metrics.items()
    )
    scores = f"| metric | value |\n|---|---|\n{rows}"
    recipe_yaml = f"```yaml\n{yaml.safe_dump(recipe, sort_keys=False)}```"
    if objective in ("skipgram", "cbow"):
        w = recipe["word2vec"]
        intro = f"""{objective} word vectors of size {w["vector_size"]} (negative sampling) trained with
mlm-pretrain {__version__} for {steps} rounds ({tokens:,} words) on {corpus}.

- `vectors.txt`, `vectors.bin`: word2vec formats (`gensim.models.KeyedVectors.load_word2vec_format`).
- `model.safetensors` (tensor `embeddings`, one row per line of `vocab.txt`) and `config.json`:
  `safetensors.torch.load_file` reads them, no code from here needed."""
        front = {"tags": ["mlm-pretrain", "word2vec", objective]}
        return card(
            f"{objective} word vectors trained with mlm-pretrain",
            front,
            _sections(scores, recipe_yaml, "Evaluation"),
            intro,
        )
    m, mlm = recipe["model"], recipe["mlm"]
    trained = f"masked-token modelling ({mlm['masking']} masking at rate {mlm['mask_rate']})"
    load = "`AutoModelForMaskedLM.from_pretrained(dir)`"
    pipeline = "fill-mask"
    usage = """```python
from transformers import pipeline

fill_mask = pipeline("fill-mask", model="path/to/this/directory")  # or its Hub repo id
mask = fill_mask.tokenizer.mask_token
fill_mask(f"It is a truth universally {mask}.", tokenizer_kwargs={"truncation": True})
```
With `truncation=True`, a longer input is cut to the tokenizer's `model_max_length`: the positions the
model has."""
    if objective == "electra":
        trained = (
            "replaced-token detection (ELECTRA): a small generator fills masked positions "
            f"({mlm['mask_rate']} of the tokens) and this encoder learns to tell every token real or replaced"
        )
        load = "`AutoModel.from_pretrained(dir)` (the generator, a masked-LM model, is in `generator/`)"
        pipeline = "feature-extraction"
        usage = """```python
from transformers import AutoModelForSequenceClassification

model = AutoModelForSequenceClassification.from_pretrained("path/to/dir", num_labels=2)
```"""
    intro = f"""A {m["num_layers"]}-layer, {m["hidden_size"]}-wide {m["type"]} encoder trained from scratch
with mlm-pretrain {__version__} for {steps} steps ({tokens:,} tokens) with {trained}. Load it with {load}, or
fine-tune it with `AutoModelForSequenceClassification.from_pretrained(dir)`; no custom code is needed.

{usage}"""
    front = {
        "library_name": "transformers",
        "pipeline_tag": pipeline,
        "tags": ["mlm-pretrain", m["type"], objective],
    }
    data_text = f"""Corpus: {corpus} (text field `{data["text_field"]}`), streamed, packed into
{data["seq_len"]}-token blocks RoBERTa FULL-SENTENCES style. Tokenizer: `{data["tokenizer"]}` (saved here
too). Validation: {", ".join(data["validation"])}."""
    sections = {
        "Data": data_text,
        **_sections(scores, recipe_yaml, f"Final metrics (validation, masking at {mlm['eval_mask_rate']})"),
    }
    return card(f"{m['type']} encoder pretrained with mlm-pretrain", front, sections, intro)


def _sections(scores: str, recipe_yaml: str, scores_heading: str) -> dict[str, str]:
    return {scores_heading: scores, "Recipe": recipe_yaml}


def hub_card(repo_id: str, architecture: str) -> str:
    """The card a push adds to a model directory that has none."""
    front = {"library_name": "transformers", "tags": ["mlm-pretrain"]}
    if architecture.endswith("ForMaskedLM"):
        front["pipeline_tag"] = "fill-mask"
    intro = f"""A `{architecture}` trained with mlm-pretrain {__version__}.

```python
from transformers import AutoModel, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
model = AutoModel.from_pretrained("{repo_id}")
```"""
    return card(repo_id.split("/")[-1], front, {}, intro)


def portable_recipe(recipe: dict, run_dir: Path) -> dict:
    """`recipe` with its local paths as an export should name them: relative to the run directory where
    they lie inside it, else by their last part, so that a published card and recipe.yaml carry no
    user's absolute paths (`@sample` and Hub ids stay as they are)."""
    recipe = copy.deepcopy(recipe)
    base = Path(run_dir).resolve()

    def portable(value):
        if not isinstance(value, str) or not value or value.startswith("@"):
            return value
        if value.startswith("hf:"):  # a Hub id, or a local directory in Hub layout
            return "hf:" + portable(value.removeprefix("hf:"))
        path = Path(value)
        if not path.is_absolute() and ".." not in path.parts:
            return value
        resolved = path.resolve()
        return str(resolved.relative_to(base)) if resolved.is_relative_to(base) else path.name

    data = recipe.get("data", {})
    data["corpus"] = [
        {**s, "path": portable(s.get("path"))} if isinstance(s, dict) else portable(s)
        for s in data.get("corpus", [])
    ]
    data["validation"] = [portable(s) for s in data.get("validation", [])]
    for group, key in (
        ("data", "tokenizer"),
        ("model", "init_from"),
        ("model", "init_embeddings"),
        ("word2vec", "tokenizer"),
    ):
        if key in recipe.get(group, {}):
            recipe[group][key] = portable(recipe[group][key])
    recipe.get("impl", {})["out"] = "."
    return recipe
