"""A quantised frozen base: the denoiser's linear layers (and, with `quantize_text_encoders`, the frozen text
encoders') stored in int8, float8 or NF4 and dequantised inside each matmul, so that a Flux-size base fits an
ordinary GPU. LoRA trains on top in fp32 (PEFT wraps torchao's and bitsandbytes' layers with its own LoRA
layers) and the saved adapter is an ordinary one, for unquantised pipelines.

The library per mode:
- int8 and fp8: torchao's weight-only configs (Int8WeightOnlyConfig, Float8WeightOnlyConfig). PyTorch's own
  quantisation library, kept up with PyTorch; it needs no custom kernels for weight-only storage, so both run
  on the CPU as well as on GPUs, and PEFT 0.21 has a LoRA layer for its tensors. (optimum-quanto also works
  but has had no release since early 2025, and Diffusers marks its quanto backend deprecated.)
- nf4: bitsandbytes' 4-bit NormalFloat, QLoRA's format; CUDA only (Diffusers refuses it without a GPU).

Quantisation happens while the weights load, through Diffusers' and Transformers' own quantizers, each weight
as it is read: peak memory is the quantised model's, and the base never exists on the GPU in full precision.
"""

from __future__ import annotations

import importlib.util
import logging
from contextlib import contextmanager
from typing import Any

import torch

from .errors import ConfigError

def import_quantization_libraries() -> None:
    """Import torchao and Diffusers' quantizers, without their noise (see `quiet_quantizers`). Diffusers'
    model classes import torchao whenever it is installed, quantised base or not, so main.py runs this before
    anything imports Diffusers."""
    if importlib.util.find_spec("torchao") is not None:
        with quiet_quantizers():
            import diffusers.quantizers  # noqa: F401
            import torchao  # noqa: F401


def check_quantization(cfg) -> None:
    """The mode's library and hardware are there, checked before any weights load."""
    if cfg.base_quantization == "nf4":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("base_quantization: 'nf4' needs bitsandbytes (pip install bitsandbytes) and a CUDA GPU; "
                              "int8 and fp8 need neither")  # fmt: skip
        if not torch.cuda.is_available():
            raise ConfigError("base_quantization: 'nf4' needs a CUDA GPU (bitsandbytes' 4-bit kernels); int8 and fp8 run anywhere")
    elif cfg.base_quantization != "none" and importlib.util.find_spec("torchao") is None:
        raise ConfigError(f"base_quantization: {cfg.base_quantization!r} needs torchao (pip install torchao; setup.sh installs it)")


def quantization_plan(cfg, family, dtype: torch.dtype) -> dict[str, Any]:
    """component -> the quantization_config its loader takes (Diffusers' for the denoiser, Transformers' for
    text encoders): the denoiser, and with quantize_text_encoders the text encoders that stay frozen. `dtype`
    is the compute dtype (the run's weight dtype)."""
    if cfg.base_quantization == "none":
        return {}
    import diffusers
    import transformers

    text_encoders = [name for name, cls in family.description.components.items() if name.startswith("text_encoder") and cls]
    frozen_text = [name for name in text_encoders if not cfg.train_text_encoder] if cfg.quantize_text_encoders else []
    configs = {}
    with quiet_quantizers():
        for name in [family.denoiser_name] + frozen_text:
            library = diffusers if name == family.denoiser_name else transformers
            if cfg.base_quantization == "nf4":
                configs[name] = library.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
            else:
                from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

                weight_only = Int8WeightOnlyConfig(set_inductor_config=False) if cfg.base_quantization == "int8" else Float8WeightOnlyConfig()
                configs[name] = library.TorchAoConfig(weight_only)
    return configs


def plain_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding a tensor's data: itself, or for a quantised tensor subclass (torchao's) the
    tensors it is made of (integer or float8 data, scales)."""
    if type(tensor) in (torch.Tensor, torch.nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [plain for name in names for plain in plain_tensors(getattr(tensor, name))]


def quantization_summary(pipe, mode: str) -> str:
    """One line: how many linear layers of which components are quantised, and their weights' bytes in the
    compute dtype and as stored."""
    layers, components, logical, stored = 0, [], 0, 0
    for name, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        quantized = [m.weight for m in module.modules() if isinstance(m, torch.nn.Linear) and type(m.weight) not in (torch.Tensor, torch.nn.Parameter)]
        if quantized:
            layers, components = layers + len(quantized), components + [name]
            logical += sum(_full_bytes(w) for w in quantized)
            stored += sum(t.numel() * t.element_size() for w in quantized for t in plain_tensors(w))
    return (f"base_quantization {mode}: {layers} linear layers of {', '.join(components) or 'nothing'}; their weights "
            f"{logical / 2**20:.3g} MiB -> {stored / 2**20:.3g} MiB")


class QuantizedLinear(torch.autograd.Function):
    """x Wᵀ + b through a frozen torchao-quantised W, whose gradient to x is grad · W dequantised again.

    torchao computes F.linear above autograd, as F.linear(x, W.dequantize(), b): autograd then keeps each layer's
    dequantised full-precision W until the backward, a whole unquantised copy of the base by the end of the
    forward, and int8 saves nothing. Here autograd keeps only the quantised W."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight, ctx.input_dtype = weight, x.dtype
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        return (grad @ ctx.weight.dequantize().to(grad.dtype)).to(ctx.input_dtype), None, None


def keep_quantized_for_backward(module: torch.nn.Module) -> None:
    """Route the forward of every torchao-quantised linear layer in `module` through QuantizedLinear
    (bitsandbytes' 4-bit layers already keep their quantised weight for the backward)."""
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear) and hasattr(layer.weight, "dequantize") and type(layer.weight).__module__.startswith("torchao"):
            layer.forward = lambda x, layer=layer: QuantizedLinear.apply(x, layer.weight, layer.bias)


def own_weights(module: torch.nn.Module) -> None:
    """Copy a quantised module's remaining full-precision tensors (biases, norms, convolutions) out of the
    memory-mapped weight file they were loaded from. While any of them points into it the whole mapping stays,
    with the pages of every weight read while quantising: on a CPU run that keeps the full-precision model
    resident beside its quantised copy. (Moving to a GPU drops those references anyway.)"""
    for sub in module.modules():
        for name, tensor in list(sub.named_parameters(recurse=False)) + list(sub.named_buffers(recurse=False)):
            if type(tensor) in (torch.Tensor, torch.nn.Parameter) and tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()


def _full_bytes(weight: torch.Tensor) -> int:
    """A quantised weight's bytes in its compute dtype (bitsandbytes' 4-bit data is packed bytes; the shape
    and dtype it stands for are in its quant_state)."""
    state = getattr(weight, "quant_state", None)
    return state.shape.numel() * state.dtype.itemsize if state is not None else weight.numel() * weight.dtype.itemsize


@contextmanager
def quiet_quantizers():
    """Without the noise of quantisation libraries: torchao's import warns about each prebuilt CUDA extension
    that does not match this machine (weight-only quantisation needs none of them), and Diffusers' torchao
    quantizer calls int8 in fp32 unsupported, which it is not (it computes in the activations' dtype)."""
    names = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
