"""PyTorch FSDP on CPU (gloo) with the models, batch, world sizes and strategies of
bench/fsdp.lua, printing the same JSON lines, so bench/compare.sh can put the two side by
side. Needs torch (from PyPI); moonshard itself never needs Python.

Usage: python bench/torch_fsdp.py [--model transformer|mlp|all] [--strategy S] [--world-size N]
                                  [--steps N] [--warmup N] [--quick]
--strategy (unsharded, FULL_SHARD, ...) and --world-size keep only the matching runs, as in
bench/fsdp.lua. Each run times --steps steps (median) after --warmup untimed ones (default: the
model's "warmup", as in bench/fsdp.lua).
"""
import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardingStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy


class CausalSelfAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.wte = nn.Embedding(cfg["vocab"], cfg["dim"])
        self.wpe = nn.Embedding(cfg["seq"], cfg["dim"])
        self.h = nn.ModuleList(Block(cfg["dim"], cfg["heads"]) for _ in range(cfg["layers"]))
        self.ln_f = nn.LayerNorm(cfg["dim"])
        self.lm_head = nn.Linear(cfg["dim"], cfg["vocab"], bias=False)
        self.register_buffer("positions", torch.arange(cfg["seq"]), persistent=False)

    def forward(self, tokens):
        x = self.wte(tokens) + self.wpe(self.positions)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        layers = []
        for _ in range(cfg["layers"]):
            layers += [nn.Linear(cfg["dim"], cfg["dim"]), nn.GELU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


MODELS = {
    "transformer": {
        "cfg": {"vocab": 256, "dim": 512, "layers": 8, "heads": 8, "seq": 64, "batch": 8},
        "build": GPT,
        "wrap": {Block},
        "warmup": 3,
    },
    "mlp": {
        "cfg": {"dim": 256, "layers": 4, "batch": 64},
        "build": MLP,
        "wrap": {nn.Linear},
        "warmup": 30,
    },
}

STRATEGIES = {
    "FULL_SHARD": ShardingStrategy.FULL_SHARD,
    "SHARD_GRAD_OP": ShardingStrategy.SHARD_GRAD_OP,
    "NO_SHARD": ShardingStrategy.NO_SHARD,
    "HYBRID_SHARD": ShardingStrategy.HYBRID_SHARD,
}


def batch(name, cfg, step):
    g = torch.Generator().manual_seed(1000 + step)
    if name == "transformer":
        shape = (cfg["batch"], cfg["seq"])
        return (torch.randint(0, cfg["vocab"], shape, generator=g),
                torch.randint(0, cfg["vocab"], shape, generator=g))
    return torch.randn(cfg["batch"], cfg["dim"], generator=g), torch.randn(cfg["batch"], cfg["dim"], generator=g)


def loss_of(name, cfg, model, x, y):
    if name == "transformer":
        return F.cross_entropy(model(x).view(-1, cfg["vocab"]), y.reshape(-1))
    return F.mse_loss(model(x), y)


def train(name, strategy, rank, size, steps, warmup, mesh_shape=None):
    spec = MODELS[name]
    cfg = spec["cfg"]
    torch.manual_seed(0)
    model = spec["build"](cfg)
    if strategy:
        kwargs = {}
        if strategy == "HYBRID_SHARD":
            from torch.distributed.device_mesh import init_device_mesh
            kwargs["device_mesh"] = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard"))
        model = FSDP(model, sharding_strategy=STRATEGIES[strategy], auto_wrap_policy=ModuleWrapPolicy(spec["wrap"]),
                     use_orig_params=True, device_id=torch.device("cpu"), **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    per_rank = cfg["batch"] // size
    times = []
    if warmup is None:
        warmup = spec["warmup"]
    for step in range(1 - warmup, steps + 1):
        x, y = batch(name, cfg, step)
        x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_of(name, cfg, model, x, y).backward()
        opt.step()
        if step > 0:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(rank, size, name, strategy, steps, warmup, mesh_shape, port, queue):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        seconds = train(name, strategy, rank, size, steps, warmup, mesh_shape)
        if rank == 0:
            queue.put(seconds)
    finally:
        dist.destroy_process_group()


def run_distributed(name, strategy, size, steps, warmup, mesh_shape, port):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, size, name, strategy, steps, warmup, mesh_shape, port, queue))
             for r in range(size)]
    for p in procs:
        p.start()
    seconds = queue.get()
    for p in procs:
        p.join()
    return seconds


def emit(**fields):
    print(json.dumps(fields), flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="all")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--strategy")
    parser.add_argument("--world-size", type=int)
    args = parser.parse_args()
    names = ["transformer", "mlp"] if args.model == "all" else [args.model]
    sizes = [args.world_size] if args.world_size else [2] if args.quick else [2, 4]

    def wanted(strategy):
        return args.strategy is None or args.strategy == strategy
    port = 29500 + os.getpid() % 1000
    for name in names:
        torch.set_num_threads(os.cpu_count() or 1)
        if wanted("unsharded"):
            seconds = train(name, None, 0, 1, args.steps, args.warmup)
            emit(bench="torch_fsdp", model=name, strategy="unsharded", world_size=1, step_ms=seconds * 1e3)
        for size in sizes:
            for strategy in ["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"]:
                if not wanted(strategy):
                    continue
                port += 1
                seconds = run_distributed(name, strategy, size, args.steps, args.warmup, None, port)
                emit(bench="torch_fsdp", model=name, strategy=strategy, world_size=size, step_ms=seconds * 1e3)
            if size == 4 and wanted("HYBRID_SHARD"):
                port += 1
                seconds = run_distributed(name, "HYBRID_SHARD", size, args.steps, args.warmup, (2, 2), port)
                emit(bench="torch_fsdp", model=name, strategy="HYBRID_SHARD", world_size=size, mesh="2x2",
                     step_ms=seconds * 1e3)


if __name__ == "__main__":
    main()
