"""Where one pretraining step's time goes: our step (sparse MLM head, fused AdamW, clipping) on random
blocks, timed, and with `--profile` a `torch.profiler` table of the operators that took the time.

It builds the step from the trainer's parts (`build_model`, `SparseMLM`, `build_optimizer`,
`clip_grad_norm`, each encoder layer compiled as `impl.compile` does) without the data loader, so the
table shows the model's own cost. `--attention` picks the attention implementation, to compare what
`parallel.attention_for` chooses with the alternative.

    python -m bench.profile_step --shape 8x512 --precision bf16 --compile --attention sdpa --profile
    python -m bench.profile_step --shape 8x512 --precision bf16 --compile --attention eager --profile
    python -m bench.profile_step --shape 8x512 --precision bf16 --matmuls   # the encoder's GEMMs alone

`--matmuls` times, instead of the step, each matmul shape of the encoder's linear layers as training calls
it (forward `x @ W^T`, input gradient `g @ W`, weight gradient `x^T @ g`, over batch x seq rows), beside
the square ceiling, alternated, so the rate the model's own matmuls can reach is measured in the same minute.

MFU is achieved FLOP/s (`bench.measure.flops_per_token`, the FLOPs our sparse head executes) over the best
and over the median of nine 2048^3 `torch.matmul`s of the same precision, measured here first.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import nullcontext
from functools import partial

import torch

from bench.measure import call_rates, flops_per_token, machine, matmul_flops
from bench.pretrain_speed import shape
from bench.sides import ROOT


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="8x512", help="LAYERSxHIDDEN (heads H/64, intermediate 4H)")
    parser.add_argument("--type", default="bert", choices=["bert", "roberta", "modernbert"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--compile", action="store_true", help="compile each layer and the head")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--tokenizer", default=str(ROOT / "tokenizers" / "shared-wordpiece-16k"))
    parser.add_argument("--steps", type=int, default=6, help="timed steps, after 4 untimed")
    parser.add_argument("--profile", action="store_true", help="then profile 3 steps")
    parser.add_argument("--matmuls", action="store_true", help="time the encoder's matmul shapes, no step")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--matmul-n", type=int, default=2048, help="the square ceiling's size")
    parser.add_argument("--rounds", type=int, default=3, help="of --matmuls")
    parser.add_argument("--smoke", action="store_true", help="a profiled 2x64 step, then --matmuls; seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shape, args.batch, args.seq_len, args.precision, args.steps = "2x64", 4, 32, "fp32", 2
        args.threads = 1
        args.tokenizer, args.profile, args.matmul_n, args.rounds = (
            str(ROOT / "tokenizers/default-wordpiece-8k"),
            True,
            256,
            1,
        )
    elif args.matmuls:
        return time_matmuls(args)

    from mlm_pretrain.models import build_model
    from mlm_pretrain.objectives.mlm import SparseMLM
    from mlm_pretrain.optim import build_optimizer
    from mlm_pretrain.parallel import clip_grad_norm, encoder_layers
    from mlm_pretrain.schema import ModelRecipe
    from mlm_pretrain.tokenizer import load_tokenizer

    print(machine(), flush=True)
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    ceiling, typical = matmul_flops(dtype, args.matmul_n)
    layers, hidden = shape(args.shape)
    tokenizer = load_tokenizer(args.tokenizer)
    torch.manual_seed(0)
    recipe = ModelRecipe(
        type=args.type,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=max(hidden // 64, 2),
        intermediate_size=4 * hidden,
    )
    model = build_model(recipe, tokenizer, args.seq_len)
    model.set_attn_implementation(args.attention)
    if args.compile:
        for layer in encoder_layers(model):
            layer.compile()
    objective = SparseMLM(model, compile_head=args.compile)
    optimizer = build_optimizer(objective, 1e-4)
    tokens = args.batch * args.seq_len
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()

    def step() -> None:
        ids = torch.randint(len(tokenizer.all_special_ids), len(tokenizer), (args.batch, args.seq_len))
        positions = torch.nonzero(torch.rand(tokens) < 0.15).squeeze(1)
        with autocast:
            loss, _ = objective(ids, torch.ones_like(ids), positions, ids.flatten()[positions], False)
        (loss / len(positions)).backward()
        clip_grad_norm(objective, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(3):
        step()
    print(f"3 untimed steps (compilation included): {time.perf_counter() - start:.1f} s")
    flops = flops_per_token(model.config, args.seq_len, 0.15)["exec_ours"] * tokens
    _, median = call_rates(step, flops, args.steps)
    seconds = flops / median
    print(
        f"{args.type} {args.shape}, batch {args.batch} x {args.seq_len}, {args.precision}, "
        f"compile {args.compile}, attention {args.attention}: median step {1000 * seconds:.0f} ms, "
        f"{tokens / seconds:,.0f} tokens/s, {flops / seconds / 1e9:.0f} GFLOP/s, "
        f"MFU {100 * flops / seconds / ceiling:.1f}% of the best {args.precision} {args.matmul_n}^3 matmul "
        f"({ceiling / 1e9:.0f} GFLOP/s), {100 * flops / seconds / typical:.1f}% of the median one "
        f"({typical / 1e9:.0f})"
    )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
        print(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
        )
    if args.smoke:
        time_matmuls(args)


def time_matmuls(args: argparse.Namespace) -> None:
    """GFLOP/s of each linear layer's three matmuls at this shape beside the square one's, in rounds."""
    print(machine(), flush=True)
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    _, hidden = shape(args.shape)
    rows = args.batch * args.seq_len
    # each kind holds 4 H^2 weights (four H x H projections; H x 4H; 4H x H), so equal shares of the FLOPs
    layers = {
        "attention q/k/v/out": (hidden, hidden),
        "up (H->4H)": (hidden, 4 * hidden),
        "down (4H->H)": (4 * hidden, hidden),
    }

    for round_ in range(args.rounds):
        ceiling, typical = matmul_flops(dtype, args.matmul_n)
        line = [
            f"round {round_ + 1}: {args.precision} {args.matmul_n}^3 best {ceiling / 1e9:.0f}, "
            f"median {typical / 1e9:.0f} GFLOP/s"
        ]
        rates = []
        for name, (fan_in, fan_out) in layers.items():
            x, w = torch.randn(rows, fan_in, dtype=dtype), torch.randn(fan_out, fan_in, dtype=dtype)
            g = torch.randn(rows, fan_out, dtype=dtype)
            flops = 2 * rows * fan_in * fan_out
            # medians of 5 calls, to compare with the square product's median
            _, forward = call_rates(partial(torch.nn.functional.linear, x, w), flops, 5)
            _, grad_input = call_rates(partial(torch.matmul, g, w), flops, 5)
            _, grad_weight = call_rates(partial(torch.matmul, x.t(), g), flops, 5)
            line.append(
                f"{name} [{rows}x{fan_in}]x[{fan_in}x{fan_out}]: forward {forward / 1e9:.0f}, "
                f"grad input {grad_input / 1e9:.0f}, grad weight {grad_weight / 1e9:.0f}"
            )
            rates += [forward, grad_input, grad_weight]
        mix = len(rates) / sum(1 / r for r in rates)  # equal FLOPs each: the time-weighted rate
        line.append(f"the encoder's mix: {mix / 1e9:.0f} GFLOP/s, {100 * mix / typical:.0f}% of the median")
        print("\n    ".join(line), flush=True)


if __name__ == "__main__":
    main()
