"""Device, dtype and quantization choices for torch models, and the CPU kernels the
transformers engine swaps in."""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Any

import torch

from llmhost.errors import ConfigError

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 / AMX); elsewhere torch emulates
    it and float32 is faster."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA device")
    return dev


def resolve_dtype(
    dtype: str, device: torch.device, stored: Any, quantization: str | None
) -> torch.dtype:
    """`auto`: bfloat16 on GPUs that have it (else float16); on CPU float32, or bfloat16 when the
    checkpoint is bfloat16 and the CPU computes it natively. CPU int8 quantizes float32 layers."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}; one of auto, {', '.join(DTYPES)}")
        chosen = DTYPES[dtype]
        if quantization == "int8" and device.type == "cpu" and chosen != torch.float32:
            raise ConfigError("int8 on CPU quantizes float32 weights; use --dtype float32 or auto")
        return chosen
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if quantization is None and str(stored).removeprefix("torch.") == "bfloat16":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return torch.float32


def quantize_cpu_int8(model: Any) -> Any:
    """Dynamic int8 quantization of every Linear layer: int8 weights with a scale per output
    channel, activations quantized per batch at run time, int8 GEMMs through FBGEMM. (torchao's
    CPU int8 paths ran 4-10 x slower than this on the same model and machine.)"""
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(
            model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True
        )


class OneDnnLinear(torch.nn.Module):
    """A Linear layer computed by oneDNN on the same weight tensor (no copy). torch's default
    CPU GEMM (MKL) handles the few-row products of batched decoding poorly, worst on AMD CPUs;
    oneDNN keeps a step over 8 sequences close to the cost of one."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            x, self.weight, self.bias, "none", [], ""
        )
        return out


def onednn_linear_works(dtype: torch.dtype) -> bool:
    """Whether this torch build has oneDNN's linear for `dtype` and it agrees with F.linear."""
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(64, 32, generator=gen).to(dtype)
        x = torch.randn(3, 2, 32, generator=gen).to(dtype)
        got = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    want = torch.nn.functional.linear(x, w)
    return bool(torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2))


def use_onednn_linears(model: torch.nn.Module) -> int:
    """Swap every float nn.Linear for OneDnnLinear; returns how many were swapped."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, name, OneDnnLinear(child))
                swapped += 1
    return swapped


def own_memory(model: torch.nn.Module) -> None:
    """Copy parameters still backed by the memory-mapped checkpoint into memory of their own,
    so that once quantization has replaced most weights the file's mapping (and the pages
    read from it) can go."""
    for param in model.parameters():
        param.data = param.data.clone()
    # the replaced float layers sit in reference cycles; collect them now, not at some later
    # allocation, so the checkpoint's mapping is released before the first request
    gc.collect()


def bnb_config(quantization: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"{quantization} on CUDA needs bitsandbytes: pip install bitsandbytes"
        ) from exc
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
    )
