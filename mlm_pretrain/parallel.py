"""How the model is spread over the processes: `parallelize(objective, impl, accelerator)` after it is
built and before its optimizer (torchtitan's shape), and the few operations that differ between the two
ways (gradient sync, clipping, a full state dict).

- `ddp`: every process holds the whole model; accelerate wraps it in DistributedDataParallel.
- `fsdp`: PyTorch's FSDP2 (`fully_shard`) shards parameters, gradients and optimizer state over the
  processes: one shard group per encoder layer (of each model: electra has two), the embeddings with
  the MLM head (tied to them; electra's generator and discriminator share theirs) in one group, the
  root last. With bf16 on a GPU, parameters are gathered in bf16 and gradients reduced
  in fp32. accelerate's own FSDP plugin is not used: it falls back to DDP on the CPU, where the tests
  run, so the sharding here is FSDP2 called directly, the same on every device.

Both take `impl.activation_checkpointing` (recompute each encoder layer in the backward pass) and
`impl.compile` (compile each encoder layer, so identical layers share one graph). Attention runs in
PyTorch's SDPA kernels, except in bf16 on a CPU (`attention_for`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from mlm_pretrain.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Iterator


def encoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks of an HF encoder (BERT, RoBERTa: encoder.layer; ModernBERT: layers)."""
    base = model.base_model
    return base.encoder.layer if hasattr(base, "encoder") else base.layers


def head_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The MLM head's modules, whose decoder is tied to the input embeddings."""
    for names in (("cls",), ("lm_head",), ("head", "decoder")):
        if all(hasattr(model, n) for n in names):
            return [getattr(model, n) for n in names]
    raise TypeError(f"no known MLM head on {type(model).__name__}")


def parallelize(objective: torch.nn.Module, impl, accelerator) -> torch.nn.Module:
    """Apply activation checkpointing, per-layer compilation and the parallelism `impl.parallel` names
    to `objective` (what `objectives.build_objective` makes: its `encoders()` are its Hugging Face
    models), in place where the method allows; return what the loop trains."""
    models = objective.encoders()
    for model in models:
        model.set_attn_implementation(attention_for(accelerator.device.type, accelerator.mixed_precision))
        if impl.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if impl.compile:
            for layer in encoder_layers(model):
                layer.compile()
    if impl.parallel == "ddp":
        return accelerator.prepare_model(objective)
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if not dist.is_initialized():
        raise InputError(
            "impl.parallel=fsdp shards over a process group: launch with torchrun or accelerate launch "
            "(`torchrun --nproc_per_node 1 -m mlm_pretrain ...` for one process)"
        )

    objective.to(accelerator.device)
    bf16_on_gpu = accelerator.mixed_precision == "bf16" and accelerator.device.type == "cuda"
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_on_gpu else None
    )
    shard = {"mp_policy": policy} if policy else {}
    for model in models:
        for layer in encoder_layers(model):
            fully_shard(layer, **shard)
    # one group for the embeddings and every module that uses their table (an MLM head's tied decoder,
    # a generator sharing its discriminator's): a parameter belongs to one group, gathered for each
    tied = [m.base_model.embeddings for m in models]
    tied += [head for m in models if m is not m.base_model for head in head_modules(m)]
    fully_shard(tied, **shard)
    fully_shard(objective, **shard)
    for name in getattr(objective, "extra_forwards", ()):
        register_fsdp_forward_method(objective, name)
    return objective


def attention_for(device_type: str, mixed_precision: str) -> str:
    """The attention implementation to train with: "sdpa", but "eager" (explicit matmuls and softmax) in
    bf16 on a CPU, where PyTorch's flash-attention backward took 12-15x its forward's time and 31% of an
    8x512 BERT step; the explicit form made that step 1.5x faster compiled and 1.2x eager
    (bench/RESULTS.md, "Where the bf16 step's time goes"). It changes how, not what, the model computes."""
    return "eager" if device_type == "cpu" and mixed_precision == "bf16" else "sdpa"


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextmanager
def no_gradient_sync(model: torch.nn.Module) -> Iterator[None]:
    """Accumulate this micro-batch's gradients locally: no all-reduce (DDP) or reduce-scatter (FSDP)."""
    if is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients to `max_norm` in total (0: no clipping); return their norm before clipping.
    With FSDP each process holds a shard of each gradient, and the norm is made whole across them."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, norm)
    return norm


def full_state_dict(objective: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights of `objective` (unwrapped), whole, on the CPU of the main process, keyed as its
    state dict ("model.", "generator.", ...: its `export` takes them); with FSDP every process must
    call this (it gathers the shards) and the others get an empty dict.

    A tied parameter (an MLM decoder is the input embedding) is one tensor under several names; the
    gathered copies no longer share storage, so it is kept under its first name only, as
    save_pretrained would."""
    if is_sharded(objective):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(objective, options=options)
    else:
        state = {k: v.detach().cpu() for k, v in objective.state_dict().items()}
    seen, tied = set(), set()
    for name, param in objective.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.add(id(param))
    return {k: v for k, v in state.items() if k not in tied}
