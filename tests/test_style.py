import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_is_clean():
    result = subprocess.run(["ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_leaves_every_file_as_it_is():
    result = subprocess.run(["ruff", "format", "--check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_tokenizers_folder_never_shadows_the_library():
    assert not (ROOT / "tokenizers" / "__init__.py").exists()
    import tokenizers

    assert hasattr(tokenizers, "Tokenizer") and ROOT / "tokenizers" not in Path(tokenizers.__file__).parents
