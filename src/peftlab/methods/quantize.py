"""4-bit base weights for QLoRA (Dettmers et al., 2023) through bitsandbytes: config, probe, memory.

QLoRA is not a method of its own here: a method that takes a `quantize` setting (LoRA) asks for
these `from_pretrained` arguments, and the frozen base model is loaded with its linear layers'
weights stored as 4-bit NF4 (or FP4) codes plus one scale per block of 64 weights. Task heads and
the output embedding stay in full precision (`KEEP_MODULES`). bitsandbytes runs 4-bit on CUDA and,
from 0.45, on the CPU; `probe` tries a real 4-bit forward and backward once, so a machine where it
cannot run is told before anything trains.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # torch loads when a model is quantized, not when a config names `quantize`
    import torch
    from torch import nn

Quantize = Literal["nf4", "fp4"]
ComputeDtype = Literal["auto", "bf16", "fp16", "fp32"]

# Modules never quantized: transformers' task-head names (fresh heads cannot be 4-bit: they are
# initialised after loading) and the LM head. Naming them replaces transformers' own automatic
# list (output embedding + last module), so the LM head must be in it too.
KEEP_MODULES = ["lm_head", "score", "classifier", "pre_classifier", "qa_outputs"]

BLOCK = 64  # weights per quantization block (bitsandbytes' default for 4-bit)
DOUBLE_QUANT_BLOCK = 256  # first-level scales per second-level block under double quantization


def compute_dtype(requested: ComputeDtype) -> torch.dtype:
    """The dtype 4-bit layers compute in: bf16 where the hardware runs it natively, else fp16 (CUDA) or fp32."""
    import torch

    if requested != "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[requested]
    from peftlab.engine import cpu_supports_bf16

    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def bnb_config(kind: Quantize, *, double_quant: bool, dtype: ComputeDtype, keep: list[str]) -> Any:
    """The BitsAndBytesConfig for a 4-bit base model."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=kind,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype(dtype),
        llm_int8_skip_modules=list(dict.fromkeys([*KEEP_MODULES, *keep])),
    )


@functools.lru_cache(maxsize=4)
def probe(kind: Quantize = "nf4") -> str | None:
    """None when bitsandbytes runs a 4-bit layer forward and backward here, else why it cannot."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type=kind).to(device)
        x = torch.randn(2, 64, device=device, requires_grad=True)
        layer(x).sum().backward()
    except Exception as exc:  # ImportError, RuntimeError (no backend), NotImplementedError, ...
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else 'no message'}"
    if x.grad is None or not torch.isfinite(x.grad).all():
        return f"bitsandbytes {getattr(bnb, '__version__', '?')} gave no usable gradient through a 4-bit layer"
    return None


def keep_training_layout(model: nn.Module) -> nn.Module:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weights the first time it runs
    in eval mode without gradients, and keeps them repacked: a training step after that (e.g. after
    the per-epoch validation) computes through a kernel with no backward, so the gradient stops at
    every 4-bit layer and earlier adapters get none (tests/methods/test_qlora.py shows it). The
    repacked weights also compute slightly differently, so a reloaded run would not reproduce its
    own predictions. The ordinary 4-bit path is used throughout instead.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def bytes_per_weight(double_quant: bool) -> float:
    """Storage of one 4-bit weight with its share of the block scales (what a QLoRA base model holds)."""
    scales = 1 / BLOCK + 4 / (BLOCK * DOUBLE_QUANT_BLOCK) if double_quant else 4 / BLOCK
    return 0.5 + scales


def quantized_bytes(model: nn.Module, *, double_quant: bool, keep: list[str]) -> float:
    """Bytes of the frozen weights once the linear layers outside `KEEP_MODULES + keep` are 4-bit.

    Works on a meta-device model (no weights needed): 4-bit for every frozen nn.Linear weight that
    bitsandbytes would replace, 4 bytes (fp32) for every other frozen parameter.
    """
    from torch import nn

    skip = set(KEEP_MODULES) | set(keep)
    quantized = {
        id(module.weight)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not skip & set(name.split(".")) and not module.weight.requires_grad
    }
    total = 0.0
    for param in {id(p): p for p in model.parameters()}.values():
        if param.requires_grad:
            continue
        total += param.numel() * (bytes_per_weight(double_quant) if id(param) in quantized else 4)
    return total
