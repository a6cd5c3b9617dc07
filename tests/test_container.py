"""The container image as the Dockerfile describes it (there is no Docker daemon here to build it): who
it runs as, what it is built from, which torch it installs, what runs as PID 1, and where the Hub's
cache and token go."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"

# the first torch release with each API the package uses: the floor in pyproject.toml is their maximum
TORCH_APIS = {
    # FSDP2: public in torch.distributed.fsdp from 2.6 (torch.distributed._composable.fsdp before)
    r"from torch\.distributed\.fsdp import": (2, 6),
    r"torch\.accelerator\.": (2, 6),
    r"torch\.distributed\.tensor import": (2, 5),
}


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            keyword, _, args = pending.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
            pending = ""
    return out


def dockerfile() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def build_args(steps: list[tuple[str, str]]) -> dict[str, str]:
    return dict(arg.split("=", 1) for keyword, arg in steps if keyword == "ARG" and "=" in arg)


def environment(steps: list[tuple[str, str]]) -> dict[str, str]:
    return dict(
        word.split("=", 1) for keyword, args in steps if keyword == "ENV" for word in shlex.split(args)
    )


def torch_of_the_tests() -> str:
    """The torch version the README's install command names: what the tests run with."""
    return re.search(r"pip install torch==([\d.]+)", (ROOT / "README.md").read_text()).group(1)


def test_runs_as_a_non_root_user():
    users = [args for keyword, args in dockerfile() if keyword == "USER"]
    assert users, "the Dockerfile has no USER: the container runs as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert user.isdigit(), "a numeric user lets Kubernetes' runAsNonRoot verify it"


def test_base_image_is_pinned_by_digest():
    steps = dockerfile()
    args = build_args(steps)
    (base,) = [args for keyword, args in steps if keyword == "FROM"]
    image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], base.split()[0])
    assert re.fullmatch(r"python:3\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", image), image


def test_torch_is_the_tested_cpu_wheel():
    steps = dockerfile()
    args = build_args(steps)
    assert args["TORCH_VERSION"] == torch_of_the_tests()
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    installs = [args for keyword, args in steps if keyword == "RUN" and "pip install" in args]
    assert installs
    # every pip install names the pinned torch, so the project's own install cannot swap it for another
    for command in installs:
        assert '"torch==${TORCH_VERSION}"' in command, command


def test_pyproject_torch_floor_is_the_oldest_release_with_the_apis_used():
    source = "\n".join(p.read_text() for p in (ROOT / "mlm_pretrain").rglob("*.py"))
    needed = max(version for pattern, version in TORCH_APIS.items() if re.search(pattern, source))
    pyproject = (ROOT / "pyproject.toml").read_text()
    floor = tuple(int(x) for x in re.search(r'"torch>=([\d.]+)"', pyproject).group(1).split("."))
    assert floor[:2] == needed
    assert tuple(int(x) for x in torch_of_the_tests().split(".")[:2]) >= needed


def test_pid_1_is_an_init_that_passes_signals_on():
    steps = dockerfile()
    (entrypoint,) = [args for keyword, args in steps if keyword == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["/usr/bin/tini", "--"]  # exec form: tini itself is PID 1
    assert any(keyword == "RUN" and re.search(r"apt-get install .*\btini\b", a) for keyword, a in steps)


def test_hub_home_is_off_the_output_volume():
    steps = dockerfile()
    hf_home = Path(environment(steps)["HF_HOME"])
    volumes = [Path(v) for keyword, args in steps if keyword == "VOLUME" for v in shlex.split(args)]
    assert volumes
    for volume in volumes:
        assert volume != hf_home and volume not in hf_home.parents, f"HF_HOME {hf_home} is on {volume}"


def test_every_documented_docker_run_allows_time_for_a_checkpoint():
    runs = [
        line
        for path in (DOCKERFILE, ROOT / "README.md")
        for line in path.read_text().splitlines()
        if re.search(r"\bdocker run\b", line) and "`docker run`" not in line
    ]
    assert runs
    for line in runs:
        assert re.search(r"--stop-timeout \d+", line), line
