"""Exports that load everywhere: under transformers 4.x as under 5, with a tokenizer that truncates to the
positions the model has, in the `fill-mask` pipeline, and as the start of a longer second phase.

transformers 4.x is not installed here (bench/RESULTS.md records the check made under 4.57.6): what it
was seen to reject or misread in a transformers 5 export is checked in the files instead.
"""

import json
from pathlib import Path

import pytest
import torch

from mlm_pretrain.errors import InputError
from mlm_pretrain.models import build_model
from mlm_pretrain.objectives.mlm import SparseMLM
from mlm_pretrain.parallel import full_state_dict
from mlm_pretrain.schema import ModelRecipe
from mlm_pretrain.tokenizer import load_tokenizer, train_tokenizer

DATA = Path(__file__).parent / "data"
SEQ_LEN = 32
# What AutoTokenizer in transformers 4.x resolves (5 saves a Unigram tokenizer as `TokenizersBackend`,
# which 4.x refuses: "Tokenizer class TokenizersBackend does not exist or is not currently imported")
TOKENIZER_CLASSES_4X = {
    "BertTokenizer",
    "BertTokenizerFast",
    "RobertaTokenizer",
    "RobertaTokenizerFast",
    "PreTrainedTokenizerFast",
}
# (model type, tokenizer kind): each model type with the tokenizer its recipes use, ModernBERT with the
# Unigram one whose class 4.x lacks
EXPORTS = {"bert": "wordpiece", "roberta": "bpe", "modernbert": "unigram"}
LONG = (
    "it is a truth universally {mask} that a single man in possession of a good fortune " + "ever so " * 200
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """A 4-layer, 32-wide model of each type, built at SEQ_LEN positions, exported by `SparseMLM.export`."""
    texts = (DATA / "austen_8k.txt").read_text(encoding="utf-8").splitlines()
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for model_type, kind in EXPORTS.items():
        train_tokenizer(texts, root / kind, kind=kind, vocab_size=300, min_frequency=1, progress=False)
        tokenizer = load_tokenizer(root / kind)
        recipe = ModelRecipe(type=model_type, hidden_size=32, num_layers=4, num_heads=2, intermediate_size=64)
        model = build_model(recipe, tokenizer, SEQ_LEN)
        objective = SparseMLM(model)
        objective.export(root / model_type, full_state_dict(objective), tokenizer)
        out[model_type] = root / model_type
    return out


def read(directory: Path, name: str) -> dict:
    return json.loads((directory / name).read_text())


@pytest.mark.parametrize("model_type", EXPORTS)
def test_the_files_hold_nothing_transformers_4_rejects_or_misreads(exports, model_type):
    directory = exports[model_type]
    tokenizer_config = read(directory, "tokenizer_config.json")
    assert tokenizer_config["tokenizer_class"] in TOKENIZER_CLASSES_4X
    # what transformers 5 writes of its own loading of a tokenizer: no setting of the tokenizer
    assert not {"is_local", "local_files_only"} & tokenizer_config.keys()
    assert tokenizer_config["model_max_length"] == SEQ_LEN  # roberta's table has 2 more rows: not usable

    config = read(directory, "config.json")
    if model_type == "modernbert":
        # 4.x ignores layer_types and rope_parameters: its own keys must describe the same layers
        every = config["global_attn_every_n_layers"]
        assert [i % every == 0 for i in range(4)] == [
            kind == "full_attention" for kind in config["layer_types"]
        ]
        assert [i % every == 0 for i in range(4)] == [True, False, False, True]
        assert config["global_rope_theta"] == config["rope_parameters"]["full_attention"]["rope_theta"]
        assert config["local_rope_theta"] == config["rope_parameters"]["sliding_attention"]["rope_theta"]


@pytest.mark.parametrize("model_type", EXPORTS)
def test_masked_lm_loads_clean_and_classification_reports_only_its_head_as_new(exports, model_type):
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    directory = exports[model_type]
    _, info = AutoModelForMaskedLM.from_pretrained(directory, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    _, info = AutoModelForSequenceClassification.from_pretrained(directory, output_loading_info=True)
    head = {
        "bert": ("bert.pooler.", "classifier."),
        "roberta": ("classifier.",),
        "modernbert": ("classifier.",),
    }
    assert info["missing_keys"] and all(key.startswith(head[model_type]) for key in info["missing_keys"])
    assert not info["mismatched_keys"]


@pytest.mark.parametrize("model_type", EXPORTS)
def test_inputs_longer_than_the_positions_are_truncated_not_an_index_error(exports, model_type):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    directory = exports[model_type]
    tokenizer = AutoTokenizer.from_pretrained(directory)
    text = LONG.format(mask=tokenizer.mask_token)
    assert len(tokenizer(text)["input_ids"]) > 10 * SEQ_LEN
    # as a Trainer's preprocessing tokenizes: truncation=True, padded batches
    batch = tokenizer([text, "a short one"], truncation=True, padding=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, SEQ_LEN)
    with torch.no_grad():
        logits = AutoModelForMaskedLM.from_pretrained(directory)(**batch).logits
    assert torch.isfinite(logits).all()

    fill_mask = pipeline("fill-mask", model=str(directory))
    predictions = fill_mask(text, top_k=3, tokenizer_kwargs={"truncation": True})
    assert len(predictions) == 3 and all(p["sequence"] for p in predictions)


def test_a_second_phase_may_train_longer_blocks_only_within_the_positions(exports):
    # BERT's 128-then-512 schedule: the first phase builds the table (model.max_position_embeddings),
    # the second continues from its export (model.init_from) with longer blocks
    tokenizer = load_tokenizer(exports["bert"])
    model = build_model(ModelRecipe(init_from=str(exports["bert"])), tokenizer, SEQ_LEN)
    assert model.config.max_position_embeddings == SEQ_LEN
    with pytest.raises(InputError, match=r"config\.json gives 32 positions, shorter than data\.seq_len 64"):
        build_model(ModelRecipe(init_from=str(exports["bert"])), tokenizer, 2 * SEQ_LEN)
    roberta = load_tokenizer(exports["roberta"])
    with pytest.raises(InputError, match="gives 32 positions"):
        build_model(ModelRecipe(init_from=str(exports["roberta"])), roberta, SEQ_LEN + 1)


def test_fine_tuning_longer_than_the_positions_truncates_to_them(exports, tmp_path, caplog):
    from mlm_pretrain.finetune import FinetuneConfig, finetune

    task = tmp_path / "task"
    task.mkdir()
    rows = [{"text": ("good " if i % 2 else "bad ") * 3 * SEQ_LEN, "label": i % 2} for i in range(40)]
    for split in ("train", "validation", "test"):
        (task / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = FinetuneConfig(epochs=1, lrs=(1e-3,), batch_size=8, max_length=128)
    result = finetune(
        exports["roberta"], str(task), seeds=1, config=config, baseline=False, from_scratch=True
    )
    assert result["config"]["max_length"] == SEQ_LEN and f"has {SEQ_LEN} positions" in caplog.text
