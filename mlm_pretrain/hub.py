"""Push an exported model directory to the Hugging Face Hub.

What goes up is decided by an allow-list (`UPLOAD_PATTERNS`), never by what happens to lie in the
directory: the files that match are linked into a staging folder, the staging folder is loaded back
with the Auto classes (no remote code, weights from safetensors only), and only then is that same folder
uploaded with `HfApi.upload_folder`. `dry_run=True` stops after the load check, so a dry run checks
exactly the files a real push sends.

The token is resolved the way huggingface_hub always does (argument, else `HF_TOKEN`, else the login
cache). It is sent in the Authorization header and nowhere else: it is never logged, and a push is
refused if any staged file contains it.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import mmap
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mlm_pretrain import __version__
from mlm_pretrain.card import hub_card
from mlm_pretrain.errors import InputError

log = logging.getLogger(__name__)

# Top-level files only: anything in a subdirectory (checkpoints/, logs/, runs/, ...) stays local.
UPLOAD_PATTERNS = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "*.model",  # sentencepiece
    "README.md",
    "*results*.json",
    "*report*.json",
    "recipe.yaml",
    "*.png",  # the loss curve the model card shows
)
UPLOAD_HELP = (
    "Uploaded (top-level files only): "
    + ", ".join(UPLOAD_PATTERNS)
    + ". Everything else stays local, notably optimizer/scheduler/RNG states (*.pt, *.pth, *.bin, "
    "trainer_state.json), pickled weights (pytorch_model.bin), subdirectories (checkpoints/, logs/, runs/) "
    "and tensorboard event files. A README.md model card is generated if the directory has none."
)

_AUTO_CLASS_BY_SUFFIX = (
    ("ForMaskedLM", "AutoModelForMaskedLM"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
    ("ForMultipleChoice", "AutoModelForMultipleChoice"),
    ("ForPreTraining", "AutoModelForPreTraining"),
    ("Model", "AutoModel"),
)
_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, ImportError)


@dataclass
class PushResult:
    repo_id: str
    revision: str
    architecture: str
    files: list[tuple[str, int]]  # (name in the repo, size in bytes), as uploaded
    skipped: list[str] = field(default_factory=list)  # paths relative to the model dir, left local
    generated_card: bool = False
    dry_run: bool = False
    commit_url: str | None = None
    private: bool | None = None  # the repository's visibility once pushed; None for a dry run

    def summary(self) -> str:
        lines = [f"{size:>14,d}  {name}" for name, size in self.files]
        lines.append(f"{sum(size for _, size in self.files):>14,d}  total, {len(self.files)} files")
        if self.generated_card:
            lines.append("README.md was generated (the directory had no model card)")
        if self.skipped:
            lines.append("left local: " + ", ".join(self.skipped))
        return "\n".join(lines)


def select_files(model_dir: Path) -> tuple[list[Path], list[str]]:
    """Split the contents of `model_dir` into files to upload and (relative) paths left local."""
    selected, skipped = [], []
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and any(fnmatch.fnmatchcase(path.name, p) for p in UPLOAD_PATTERNS):
            selected.append(path)
        else:
            skipped.append(path.name + ("/" if path.is_dir() else ""))
    return selected, skipped


def _require_model_files(names: set[str], model_dir: Path) -> None:
    missing = []
    if "config.json" not in names:
        missing.append("config.json")
    if "model.safetensors" not in names and "model.safetensors.index.json" not in names:
        hint = (
            " (pytorch_model.bin is never uploaded: save with safe_serialization)"
            if (model_dir / "pytorch_model.bin").exists()
            else ""
        )
        missing.append("model.safetensors" + hint)
    if not names & {"tokenizer.json", "tokenizer_config.json"}:
        missing.append("tokenizer.json or tokenizer_config.json")
    if missing:
        raise InputError(
            f"{model_dir} is not a loadable Hugging Face model directory: missing {'; '.join(missing)}"
        )


def stage_folder(model_dir: Path, staging: Path, repo_id: str) -> tuple[list[str], bool]:
    """Link (or copy) the allow-listed files of `model_dir` into `staging`, adding a model card if none.

    Returns the skipped paths and whether README.md was generated.
    """
    selected, skipped = select_files(model_dir)
    _require_model_files({p.name for p in selected}, model_dir)
    for src in selected:
        try:
            os.link(src, staging / src.name)
        except OSError:
            shutil.copy2(src, staging / src.name)
    generated = not (staging / "README.md").exists()
    if generated:
        architecture = _architecture(staging)
        (staging / "README.md").write_text(hub_card(repo_id, architecture), encoding="utf-8")
    return skipped, generated


def _architecture(folder: Path) -> str:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"config.json: not valid JSON ({err})") from err
    if not config.get("architectures"):
        raise InputError("config.json: no `architectures` entry, so no Auto class is known to load it")
    return config["architectures"][0]


def check_loadable(folder: Path) -> str:
    """Load `folder` with AutoConfig, AutoTokenizer and the Auto model class `config.architectures` names.

    No remote code, weights from safetensors only, every weight of the model present with its shape.
    Extra weights are allowed, as the Hub's own BERT checkpoints carry a pooler their masked-LM class
    does not use. Returns the architecture.
    """
    import transformers

    architecture = _architecture(folder)
    auto_name = next((auto for suffix, auto in _AUTO_CLASS_BY_SUFFIX if architecture.endswith(suffix)), None)
    if auto_name is None:
        raise InputError(f"config.json: no Auto class loads architecture {architecture!r}")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        model, info = getattr(transformers, auto_name).from_pretrained(
            folder, trust_remote_code=False, use_safetensors=True, output_loading_info=True
        )
    except _LOAD_ERRORS as err:
        raise InputError(f"the staged model does not load with {auto_name}: {err}") from err
    problems = [
        f"{key}: {sorted(info[key])[:5]}" for key in ("missing_keys", "mismatched_keys") if info.get(key)
    ]
    if problems:
        raise InputError(f"model.safetensors does not match {architecture}: " + "; ".join(problems))
    if auto_name != "AutoModel" and type(model).__name__ != architecture:
        raise InputError(f"config.json names {architecture} but {auto_name} builds {type(model).__name__}")
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise InputError(
            f"the tokenizer has {len(tokenizer)} tokens but config.json has vocab_size {vocab_size}"
        )
    if architecture.endswith("ForMaskedLM") and tokenizer.mask_token is None:
        raise InputError("tokenizer_config.json: a masked-LM tokenizer needs a mask_token")
    return architecture


def _refuse_files_holding(token: str, folder: Path) -> None:
    needle = token.encode()
    for path in sorted(folder.iterdir()):
        if path.stat().st_size == 0:
            continue
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data.find(needle) != -1:
                raise InputError(f"{path.name} contains your Hugging Face token: refusing to upload it")


def push_to_hub(
    model_dir: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    dry_run: bool = False,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Stage, check and (unless `dry_run`) upload `model_dir` to the model repo `repo_id`.

    The repo is created if needed (`private` only applies at creation; pushing with `private=True` to an
    existing public repo is refused). A `revision` other than main is created as a branch if needed.
    `endpoint` overrides the Hub URL (default: `HF_ENDPOINT` or https://huggingface.co).
    Raises InputError for a directory that is not a loadable model, a bad repo id, no/refused token.
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"{model_dir}: no such directory")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise InputError(f"--repo-id {repo_id!r}: {err}") from err
    revision = revision or "main"
    if not dry_run:
        token = token or get_token()
        if not token:
            raise InputError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")

    with tempfile.TemporaryDirectory(prefix="mlm-pretrain-push-") as tmp:
        staging = Path(tmp)
        skipped, generated = stage_folder(model_dir, staging, repo_id)
        architecture = check_loadable(staging)
        result = PushResult(
            repo_id=repo_id,
            revision=revision,
            architecture=architecture,
            files=[(p.name, p.stat().st_size) for p in sorted(staging.iterdir())],
            skipped=skipped,
            generated_card=generated,
            dry_run=dry_run,
        )
        if dry_run:
            return result
        _refuse_files_holding(token, staging)

        api = HfApi(endpoint=endpoint, token=token)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            result.private = bool(api.model_info(repo_id).private)  # an existing repo keeps its own
            if private and not result.private:
                raise InputError(f"{repo_id} already exists and is public: refusing to push with --private")
            if revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            visibility = "private" if result.private else "public"
            log.info(
                "uploading %d files to %s@%s (a %s repository)", len(result.files), url, revision, visibility
            )
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=staging,
                revision=revision,
                commit_message=commit_message or f"Upload {architecture} with mlm-pretrain {__version__}",
            )
        except HfHubHTTPError as err:
            status = err.response.status_code if err.response is not None else None
            if status in (401, 403):
                raise InputError(f"the Hub refused the token for {repo_id} (HTTP {status}): {err}") from err
            raise
    result.commit_url = commit.commit_url
    log.info("pushed %s to %s", model_dir, result.commit_url)
    return result


def push_checkpoint(
    export_dir: str | os.PathLike, repo_id: str, step: int | None = None, *, private: bool = False, **kwargs
) -> PushResult | None:
    """For the trainer: push an exported HF dir every N checkpoints without stopping the run on a Hub hiccup.

    `private` creates the repo private (the recipe's `impl.push_private`); `kwargs` go to `push_to_hub`
    (revision, token, endpoint). An InputError (the export is not a loadable model, no token, token
    refused, a public repo pushed to with `private`) is raised; any other failure (network, Hub 5xx) is
    logged as a warning and returns None, so a long run survives a flaky connection.
    """
    message = f"Checkpoint at step {step}" if step is not None else "Checkpoint"
    kwargs.setdefault("commit_message", message)
    try:
        return push_to_hub(export_dir, repo_id, private=private, **kwargs)
    except InputError:
        raise
    except Exception as err:  # best effort by design, see the docstring
        log.warning(
            "push of %s to %s failed, training goes on: %s: %s", export_dir, repo_id, type(err).__name__, err
        )
        return None
