"""The AR -> diffusion connector of BLIP3o-NEXT.

`Linear(h, d) -> GELU(tanh) -> Linear(d, d) -> RMSNorm(d)`, d = 2304 (SANA's caption width) in the
published model. It maps the AR model's last-layer hidden states at the image positions to SANA's
`encoder_hidden_states`. Frozen during GRPO.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CONNECTOR_WEIGHTS = "connector.safetensors"
CONNECTOR_CONFIG = "connector.json"


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale, eps 1e-5 as in BLIP3o-NEXT (diffusers' RMSNorm, affine)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


class Connector(nn.Module):
    def __init__(self, ar_hidden_size: int, out_dim: int = 2304):
        super().__init__()
        self.ar_hidden_size = ar_hidden_size
        self.out_dim = out_dim
        self.layers = nn.Sequential(
            nn.Linear(ar_hidden_size, out_dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(out_dim, out_dim),
            RMSNorm(out_dim),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.layers(hidden_states)  # [B, N, h] -> [B, N, d]

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / CONNECTOR_WEIGHTS))
        config = {"ar_hidden_size": self.ar_hidden_size, "out_dim": self.out_dim}
        (directory / CONNECTOR_CONFIG).write_text(json.dumps(config, indent=2))

    @classmethod
    def load(cls, directory: Path) -> "Connector":
        config = json.loads((directory / CONNECTOR_CONFIG).read_text())
        connector = cls(**config)
        connector.load_state_dict(load_file(str(directory / CONNECTOR_WEIGHTS)))
        return connector.eval().requires_grad_(False)
