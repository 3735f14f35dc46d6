"""NKAT-ViT: a small vision transformer whose block linears are StarLinear layers.

Options (ViTConfig): conv stem (off | tiny | small), patch size, color-wise LayerNorm (a
LayerNorm over the channels of each pixel, before the stem), attention temperature and
top-k / top-p sparsified attention, dropout, and the star-product's strength, decay and rank.
Block l's q, k, v, o projections (square: antisymmetric theta) and MLP (general theta) use
s_l = nkat_strength * nkat_decay^l.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .config import ViTConfig
from .star import StarLinear, layer_strength, theta_parameter_count

def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.GELU())


def make_stem(kind: str, in_channels: int) -> tuple[nn.Module, int, int]:
    """(stem, its output channels, its total stride)."""
    if kind == "off":
        return nn.Identity(), in_channels, 1
    layers = [_conv_bn(in_channels, 32, 2), _conv_bn(32, 64, 2)]
    if kind == "small":
        layers.append(_conv_bn(64, 64, 1))
    return nn.Sequential(*layers), 64, 4


class ColorNorm(nn.Module):
    """LayerNorm over the channels of each pixel (the recipe's "color-wise LayerNorm")."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def sparsify(attn: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Zero all but the top-k / top-p attention weights of each query, then renormalize."""
    if top_k and top_k < attn.shape[-1]:
        kth = attn.topk(top_k, dim=-1).values[..., -1:]
        attn = attn * (attn >= kth)
    if top_p < 1.0:
        sorted_w, order = attn.sort(dim=-1, descending=True)
        before = sorted_w.cumsum(dim=-1) - sorted_w  # weight of the keys ranked above this one
        keep_sorted = before < top_p * sorted_w.sum(dim=-1, keepdim=True)
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        attn = attn * keep
    return attn / attn.sum(dim=-1, keepdim=True).clamp_min(1e-12)


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig, strength: float):
        super().__init__()
        self.heads, self.temperature = cfg.heads, cfg.temperature
        self.top_k, self.top_p = cfg.top_k, cfg.top_p
        self.scale = 1.0 / (math.sqrt(cfg.dim // cfg.heads) * cfg.temperature)
        star = dict(rank=cfg.nkat_rank, strength=strength)
        self.q, self.k, self.v, self.o = (StarLinear(cfg.dim, cfg.dim, **star) for _ in range(4))
        self.drop = nn.Dropout(cfg.attn_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads

        def split(t):
            return t.view(b, n, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        if self.top_k or self.top_p < 1.0:
            attn = sparsify(attn, self.top_k, self.top_p)
        out = self.drop(attn) @ v
        return self.o(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig, layer: int):
        super().__init__()
        strength = layer_strength(cfg.nkat_strength, cfg.nkat_decay, layer)
        hidden = int(round(cfg.dim * cfg.mlp_ratio))
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg, strength)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.fc1 = StarLinear(cfg.dim, hidden, rank=cfg.nkat_rank, strength=strength)
        self.fc2 = StarLinear(hidden, cfg.dim, rank=cfg.nkat_rank, strength=strength)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class NKATViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.color_norm = ColorNorm(cfg.in_channels) if cfg.color_norm and cfg.in_channels > 1 else nn.Identity()
        self.stem, channels, stride = make_stem(cfg.stem, cfg.in_channels)
        side = math.ceil(cfg.image_size / stride)
        self.pad = (-side) % cfg.patch  # the feature map is zero-padded to a multiple of the patch
        self.grid = (side + self.pad) // cfg.patch
        self.patch_embed = nn.Conv2d(channels, cfg.dim, cfg.patch, stride=cfg.patch)
        self.pos = nn.Parameter(torch.zeros(1, self.grid * self.grid, cfg.dim))
        self.emb_drop = nn.Dropout(cfg.emb_dropout)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.color_norm(x))
        if self.pad:
            x = F.pad(x, (0, self.pad, 0, self.pad))
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = self.emb_drop(x + self.pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def theta_parameter_count(self) -> int:
        return theta_parameter_count(self)

    @property
    def tokens(self) -> int:
        return self.grid * self.grid
