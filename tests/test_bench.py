"""Every benchmark script's `--smoke` run, as a user runs it (`python -m bench.<script> --smoke`, a child
process, a tiny model on the data the repository ships), and its printed result checked for sense: speeds
above zero, ratios that are ratios, scores that are scores. `python -m pytest -m bench` runs them alone."""

import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.bench, pytest.mark.slow]
NUMBER = r"([0-9][0-9,]*\.?[0-9]*(?:e[-+]?[0-9]+)?)"


def smoke(*command: str, env: dict | None = None) -> str:
    """Run a smoke command from the checkout's root (one torch thread: the machine is shared) and return its
    standard output; a failure shows the end of both streams."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        **(env or {}),
    }
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, f"{command}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def bench(script: str) -> str:
    return smoke(sys.executable, "-m", f"bench.{script}", "--smoke")


def numbers(pattern: str, text: str) -> list[float]:
    """Every match of `pattern` (NUMBER marks the figure) in `text`, as floats; at least one."""
    found = [float(x.replace(",", "")) for x in re.findall(pattern.replace("NUMBER", NUMBER), text)]
    assert found, f"no {pattern!r} in:\n{text[-3000:]}"
    return found


def ratio(text: str) -> float:
    """The speed ratio of a `bench.sides.direction` line: above 1 ours is faster."""
    match = re.search(r"ours ([0-9.]+)x (faster|slower) than", text)
    assert match, text[-3000:]
    return float(match[1]) if match[2] == "faster" else 1 / float(match[1])


def test_gpu_check_smoke_runs_the_pretraining_benchmark_on_the_cpu_into_one_report(tmp_path):
    """The GPU check's CPU path, which is also `bench.pretrain_speed --smoke`'s test: ours against the HF
    Trainer at 2x64, both sides' tokens/s and the MFU columns filled."""
    report = tmp_path / "gpu_check.md"
    env = {"GPU_CHECK_SMOKE": "1", "GPU_CHECK_REPORT": str(report)}
    out = smoke("bash", "bench/gpu_check.sh", env=env)
    assert "every step passed" in out
    text = report.read_text()
    assert "5 tests collected" in text and "**every step passed**" in text
    row = re.search(r"\|\s+fp32 \|\s+([0-9.,]+) \|\s+([0-9.,]+) \|\s+([0-9.]+)x", text)
    assert row, text[-3000:]
    ours, hf, speedup = (float(x.replace(",", "")) for x in row.groups())
    assert ours > 0 and hf > 0 and speedup == pytest.approx(ours / hf, rel=0.02)
    assert all(0 < x < 1000 for x in numbers(r"NUMBER% \|", text))  # MFU, of a tiny model on a busy machine


def test_gpu_check_without_a_gpu_says_so_and_exits_at_once():
    if (
        shutil.which("nvidia-smi")
        and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
    ):
        pytest.skip("this machine has a GPU")
    started = time.perf_counter()
    done = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=5)
    assert done.returncode == 0 and "no CUDA device" in done.stdout
    assert time.perf_counter() - started < 1


def test_finetune_speed_smoke():
    out = bench("finetune_speed")
    assert all(x > 0 for x in numbers(r"\| no \| [^|]+ \| NUMBER \|", out))
    accuracies = numbers(r"\| no \| [^|]+ \| [0-9.]+ \| NUMBER \|", out)
    assert len(accuracies) == 3 and all(0 <= a <= 1 for a in accuracies)
    assert all(r > 0 for r in numbers(r"examples/s ratio NUMBER", out))


def test_loader_speed_smoke():
    out = bench("loader_speed")
    assert all(x > 0 for x in numbers(r"(?m)^\|\s+ours \|\s+NUMBER \|", out))
    # the stream drops no token (run_mlm's group_texts drops each map batch's remainder), at both sizes
    assert numbers(r"(?m)^\|\s+ours \|(?:[^|]+\|){7}\s+NUMBER \|", out) == [0, 0]
    assert ratio(out) > 0 and "wrote" in out


def test_tokenizer_speed_smoke():
    out = bench("tokenizer_speed")
    assert all(x > 0 for x in numbers(r"\| (?:wordpiece|bpe)\s+\| (?:ours|raw) \|\s+NUMBER \|", out))
    assert ratio(out) > 0


def test_resume_cost_smoke():
    out = bench("resume_cost")
    assert out.count("| yes (") == 3  # every restored stream yielded the reference's blocks
    assert all(x >= 0 for x in numbers(r"restore NUMBER s", out))


def test_word2vec_speed_smoke():
    out = bench("word2vec_speed")
    assert ratio(out) > 0
    speeds = numbers(r'"words_per_s": NUMBER', out)
    assert len(speeds) == 2 and all(x > 0 for x in speeds)
    assert all(x < 1e-3 for x in numbers(r'"eval_mismatch": NUMBER', out))  # our evaluation is gensim's


def test_producer_overlap_smoke():
    out = bench("producer_overlap")
    assert numbers(r"producer: NUMBERx faster", out)[0] > 0
    assert numbers(r"loader alone, one core: NUMBER tokens/s", out)[0] > 0


def test_fsdp_memory_smoke():
    out = bench("fsdp_memory")
    # each of 2 processes holds half of the model state under FSDP2: a real measurement, not a constant
    assert numbers(r"FSDP holds NUMBERx the model state", out)[0] == pytest.approx(0.5, abs=0.05)
    assert all(x > 0 for x in numbers(r"\|\s+tokens/s \(both processes\) \|\s+NUMBER \|", out))


def test_cram_finetune_smoke():
    out = bench("cram_finetune")
    scores = numbers(r"\| NUMBER \[", out)
    assert len(scores) == 2 and all(0 <= s <= 1 for s in scores)  # random init and the checkpoint
    assert "cram_finetune.png" in out


def test_cram_search_smoke():
    out = bench("cram_search")
    assert numbers(r"\| modernbert-lr1e-3-mask30 \| yes \| NUMBER \|", out)[0] > 0
    assert all(math.isfinite(x) and x > 0 for x in numbers(r"M: NUMBER /", out))


def test_profile_step_smoke():
    out = bench("profile_step")
    assert numbers(r"ms, NUMBER tokens/s", out)[0] > 0
    assert numbers(r"the encoder's mix: NUMBER GFLOP/s", out)[0] > 0
    assert "Self CPU time total" in out  # the profiler's table


def test_wall_time_smoke():
    out = bench("wall_time")
    losses = numbers(r"\| (?:ours|hf) [^|]+ \| [0-9]+ \| [0-9,]+ \| NUMBER \|", out)
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
