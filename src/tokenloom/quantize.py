"""`dtype="int8"` for CPU inference: the decoder's linear layers quantised with PyTorch's dynamic int8
(int8 weights, activations quantised per step; `torch.ao.quantization.quantize_dynamic`).

It pays where the linears dominate a step (large models); for the embedded model's small layers
it is slower than float32. The embedding and the output head stay float32 (the head's rows are
what sampling reads, and LoRA and scoring use its weight); so does the VQGAN.

The feed-forward's down projection (w2) stays float32 too: its input, the SwiGLU product, has outlier
channels that per-tensor int8 activations flatten, and quantising it costs far more agreement with
float32 than the other layers do. The measurements: docs/engine.md, "Speed".
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

INT8 = "int8"


QUANTIZED = ("attention", "feed_forward.w1", "feed_forward.w3")  # submodules of each block (see above)


def quantize_int8(model: nn.Module) -> nn.Module:
    """The model with the linears of its transformer blocks but the down projections replaced by dynamic
    int8 ones, in place. CPU only: the quantised kernels (fbgemm / onednn) exist for the CPU."""
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("dtype int8 is for CPU inference (dynamic int8 kernels run on the CPU only)")
    model.float()
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao; it still works
        warnings.simplefilter("ignore")
        for i, layer in enumerate(model.layers):
            spec = {name: torch.ao.quantization.default_dynamic_qconfig for name in QUANTIZED}
            model.layers[i] = torch.ao.quantization.quantize_dynamic(layer, spec, dtype=torch.qint8)
    return model.eval()
