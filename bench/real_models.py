"""Random-weight ONNX models of real size for the CPU benches: the ratio then measures inference
as production runs it, not the overhead around a toy model.

The WD v3 ViT tagger (SmilingWolf/wd-vit-tagger-v3: ViT-B/16 at 448, no class token, average
pool) is written here in plain torch (a runtime dependency) and exported with torch's
TorchScript exporter. timm would be the obvious source of the architecture, but timm needs
torchvision, and the only torchvision on PyPI is built against CUDA torch (its operators fail to
load with the CPU torch the project pins); the dynamo exporter needs onnxscript. Same contract
as the production export (deepghs/wd14_tagger_with_embeddings): input [batch, 448, 448, 3]
float32 BGR 0..255, outputs "output" (sigmoid scores, one per label) and "embedding" (768).

Exported files are cached (a 380 MB file, about a minute to export on two cores).
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE = Path(os.environ.get("BOORUSET_BENCH_CACHE", Path.home() / ".cache" / "booruset-bench"))
VERSION = 1  # part of the cached file's name: bump when the architecture, weights or export change


def wd_vit_tagger(path: Path, n_labels: int, size: int = 448, seed: int = 0) -> Path:
    """Write the WD v3 ViT-B/16 tagger (random weights) to `path` unless it is there already."""
    if path.is_file():
        return path
    import torch

    model = wd_vit_module(n_labels, size, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with torch.no_grad():
        torch.onnx.export(model, (torch.zeros(1, size, size, 3),), str(partial), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output", "embedding"],
                          dynamic_axes={"input": {0: "batch_size"}, "output": {0: "batch_size"},
                                        "embedding": {0: "batch_size"}})
    partial.rename(path)  # a killed export leaves no half file under the cached name
    return path


def wd_vit_module(n_labels: int, size: int = 448, seed: int = 0, fused_attention: bool = False):
    """The WD v3 ViT-B/16 tagger as a torch module (eval mode, random weights). fused_attention:
    torch's scaled_dot_product_attention (for timing in torch on a GPU); the export keeps the
    plain matmuls and softmax, the graph the CPU benches were measured on."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, dim: int, heads: int) -> None:
            super().__init__()
            self.heads = heads
            self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
            self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)
            self.mlp = nn.Sequential(nn.Linear(dim, dim * 4), nn.GELU(approximate="tanh"), nn.Linear(dim * 4, dim))

        def forward(self, x):
            b, n, d = x.shape
            q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            if fused_attention:  # the same softmax(q k^T / sqrt(d_head)) v in one kernel on a GPU
                attended = nn.functional.scaled_dot_product_attention(q, k, v)
            else:
                attended = (q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5).softmax(-1) @ v
            x = x + self.proj(attended.transpose(1, 2).reshape(b, n, d))
            return x + self.mlp(self.norm2(x))

    class Tagger(nn.Module):
        def __init__(self, dim: int = 768, depth: int = 12, heads: int = 12, patch: int = 16) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, dim, patch, patch)
            self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2, dim) * 0.02)
            self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
            self.norm = nn.LayerNorm(dim, eps=1e-6)
            self.head = nn.Linear(dim, n_labels)

        def forward(self, bgr):
            # the WD v3 exports take NHWC BGR 0..255 and normalise inside (mean 0.5, std 0.5)
            x = bgr.permute(0, 3, 1, 2).flip(1) / 127.5 - 1.0
            x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
            embedding = self.norm(self.blocks(x)).mean(1)
            return torch.sigmoid(self.head(embedding)), embedding

    torch.manual_seed(seed)
    model = Tagger().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        # random features score every label near 0.5; a low bias leaves a booru-like few dozen
        # above the score floor, so post-processing handles as many tags as in production
        model.head.bias.fill_(-4.0)
    return model
