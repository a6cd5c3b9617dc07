#!/usr/bin/env bash
# The GPU check, one command on a CUDA machine, under 8 minutes, one Markdown report:
#   1. the CUDA tests (tests/test_device_cuda.py: tiny pretraining in fp32 and bf16 + compile, resume,
#      FSDP2 on one GPU under torchrun, fine-tuning);
#   2. bert-base at seq 128 (batch 256) and 512 (batch 64), bf16 + compile, ours against the HF Trainer
#      run_mlm path (python -m bench.pretrain_speed --device cuda): tokens/s, MFU against the GPU's
#      data-sheet bf16 peak and against a measured 8192^3 bf16 matmul, peak GPU memory.
#
#   bash bench/gpu_check.sh                    # writes bench/results/gpu_check.md
#   GPU_CHECK_SMOKE=1 bash bench/gpu_check.sh  # (or --smoke) every step on the CPU at tiny sizes, seconds
#
# Without a GPU (no working nvidia-smi) it says so and exits 0 at once. GPU_CHECK_REPORT names another
# report file. The exit status is 0 when every step passed, 1 otherwise; the report says which failed.
set -uo pipefail
cd "$(dirname "$0")/.."

smoke=${GPU_CHECK_SMOKE:-0}
[[ "${1:-}" == "--smoke" ]] && smoke=1
if [[ "$smoke" != 1 ]] && ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no CUDA device (nvidia-smi finds none): nothing to check"
    exit 0
fi
report=${GPU_CHECK_REPORT:-bench/results/gpu_check.md}
mkdir -p "$(dirname "$report")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
failed=()

# step NAME SECONDS COMMAND...: run it under a time limit, its output into the report as a section
step() {
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout "$limit" "$@" >"$work/out" 2>&1
    local code=$?
    {
        echo "## $name"
        echo
        echo "\`$*\`: exit $code after $((SECONDS - started)) s$([[ $code == 124 ]] && echo " (past its ${limit} s limit)")"
        echo
        echo '```'
        tail -n 60 "$work/out"
        echo '```'
        echo
    } >>"$report"
    [[ $code == 0 ]] || failed+=("$name")
    echo "gpu_check: $name: exit $code" >&2
}

{
    echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')$([[ "$smoke" == 1 ]] && echo ' (smoke: CPU, tiny sizes)')"
    echo
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' + uncommitted changes')"
    echo "- $(python -c 'from bench.measure import machine; print(machine())')"
    echo "- nvidia-smi: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)"
    echo
} >"$report"

if [[ "$smoke" == 1 ]]; then
    # the CPU path of every step: the CUDA tests collected (they skip without a GPU), the benchmark's smoke
    step "CUDA tests (collected only)" 120 python -m pytest tests/test_device_cuda.py -m cuda -q --collect-only
    step "pretraining throughput (smoke)" 300 python -m bench.pretrain_speed --smoke
else
    step "CUDA tests" 130 python -m pytest tests/test_device_cuda.py -m cuda -q -p no:cacheprovider
    gpu=(python -m bench.pretrain_speed --device cuda --shapes 12x768 --settings bf16-compile --rounds 1
        --warmup 5 --steps 20 --side-timeout 75 --tokenizer "$work/wordpiece-30k")
    # each side ends itself after 75 s (--side-timeout), well before the step's limit cuts its parent
    step "bert-base, seq 128, batch 256" 170 "${gpu[@]}" --seq-lens 128 --batches 256
    step "bert-base, seq 512, batch 64" 170 "${gpu[@]}" --seq-lens 512 --batches 64
fi

if ((${#failed[@]})); then
    echo "**failed: ${failed[*]}**" >>"$report"
    echo "gpu_check: failed: ${failed[*]}; report: $report"
    exit 1
fi
echo "**every step passed**" >>"$report"
echo "gpu_check: every step passed; report: $report"
