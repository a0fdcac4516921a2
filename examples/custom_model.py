"""Parallelize your own transformer with a custom tensor-parallel plan.

torchrun --standalone --nproc_per_node 4 examples/custom_model.py --mesh 1x2x2
"""

import argparse

import torch
from torch import nn

from ucfvit.parallel import make_mesh, parallelize


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm, self.head_dim = nn.LayerNorm(dim), dim // heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim) for _ in range(4))
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (w(self.norm(x)).view(b, n, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        x = x + self.wo(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))
        return x + self.down(torch.relu(self.up(x)))


class TinyTransformer(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, depth: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(Layer(dim, heads) for _ in range(depth))
        self.out = nn.Linear(dim, 1)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.out(x).mean()


# Module-name patterns ('*' = one name segment) -> "colwise" | "rowwise" | a ParallelStyle.
PLAN = {
    f"layers.*.{n}": s
    for n, s in [
        ("wq", "colwise"),
        ("wk", "colwise"),
        ("wv", "colwise"),
        ("wo", "rowwise"),
        ("up", "colwise"),
        ("down", "rowwise"),
    ]
}

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--mesh", default="1x1x1")
    mesh = make_mesh(parser.parse_args().mesh)
    model = parallelize(TinyTransformer(), mesh, plan=PLAN, blocks=["layers.*"])  # FSDP unit per layer
    model(torch.randn(4, 8, 32)).backward()
    if torch.distributed.get_rank() == 0:
        print({n: f"{type(p).__name__}{tuple(p.placements)}" for n, p in list(model.named_parameters())[:4]})
