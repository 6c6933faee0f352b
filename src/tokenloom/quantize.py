"""`dtype="int8"` for CPU inference: the decoder's linear layers quantised with PyTorch's dynamic int8
(int8 weights, activations quantised per step; `torch.ao.quantization.quantize_dynamic`).

It pays where the linears dominate a step: on two CPU cores a decode step's [2, 768] x [768, 2048]
matmul is 3.2x faster than float32, a 7B-size one 6.3x; for shapes-tiny's small layers it is slower
(docs/engine.md, "Speed"). The embedding and the output head stay float32 (the head's rows
are what sampling reads, and LoRA and scoring use its weight); so does the VQGAN.

The feed-forward's down projection (w2) stays float32 too: its input, the SwiGLU product, has outlier
channels that per-tensor int8 activations flatten. Quantising it as well, shapes-tiny's next-token
choice agreed with float32 at 78% of the positions of held-out documents; without it, at 97% (mean
total-variation distance of the next-token distributions 0.18 against 0.03).
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
