"""Newton-Schulz accuracy: each implementation's distance to the exact iteration (NS5 in fp64) on
matrices with chosen singular-value spectra. CPU is enough (half-precision matmuls are emulated with
fp32 accumulation and one rounding, as on the GPU); a few seconds at the default sizes.

    python scripts/ns_accuracy.py
    python scripts/ns_accuracy.py --sizes 256x896 128x2048

Columns: torch.optim.Muon's bf16 loop, our standard NS in bf16, Gram NS in fp16 and bf16 with the
default restart (before iteration 3), and Gram fp16 without a restart (why the restart exists).
"""

import argparse

import torch
from torch.optim._muon import _zeropower_via_newtonschulz as torch_muon_ns

from k2train.optim.newton_schulz import NS_COEFFICIENTS, zeropower_via_gram_newtonschulz, zeropower_via_newtonschulz


def spectrum(kind: str, n: int, m: int, k: int, seed: int) -> torch.Tensor:
    """n matrices [m, k] with random singular vectors and the named singular-value profile."""
    g = torch.Generator().manual_seed(seed)
    if kind == "flat":
        return torch.randn(n, m, k, generator=g)
    U = torch.linalg.qr(torch.randn(n, m, m, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, k, m, generator=g, dtype=torch.float64))[0]
    i = torch.arange(1, m + 1, dtype=torch.float64)
    s = {
        "1/i": 1 / i,
        "1/i^2": i**-2.0,
        "exp": torch.exp(-i / (m / 20)),
        "lowrank": torch.where(i <= 8, 100.0, 0.01) * (1 + 0.1 * torch.rand(m, generator=g, dtype=torch.float64)),
    }[kind]
    return ((U * s) @ V.mT).float()


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm(dim=(-2, -1)) / ref.norm(dim=(-2, -1))).max().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["256x896", "128x2048", "384x512"])
    ap.add_argument("--count", type=int, default=4, help="matrices per size and spectrum")
    args = ap.parse_args()
    cols = {
        "torch Muon bf16": lambda G: torch.stack([torch_muon_ns(g, NS_COEFFICIENTS, 5, 1e-7) for g in G]),
        "ours std bf16": lambda G: zeropower_via_newtonschulz(G, dtype=torch.bfloat16),
        "Gram fp16": lambda G: zeropower_via_gram_newtonschulz(G, dtype=torch.float16),
        "Gram bf16": lambda G: zeropower_via_gram_newtonschulz(G, dtype=torch.bfloat16),
        "Gram fp16 no restart": lambda G: zeropower_via_gram_newtonschulz(G, dtype=torch.float16, restarts=()),
    }
    print("max relative Frobenius distance to NS5 in fp64\n")
    print(f"| {'size':9s} | {'spectrum':8s} | " + " | ".join(f"{c:>20s}" for c in cols) + " |")
    print(f"|{'-' * 11}|{'-' * 10}|" + "|".join("-" * 22 for _ in cols) + "|")
    for size in args.sizes:
        m, k = map(int, size.split("x"))
        for j, kind in enumerate(["flat", "1/i", "1/i^2", "exp", "lowrank"]):
            G = spectrum(kind, args.count, m, k, seed=m + k + j)
            exact = zeropower_via_newtonschulz(G.double(), dtype=torch.float64)
            print(f"| {size:9s} | {kind:8s} | " + " | ".join(f"{rel(fn(G), exact):20.4f}" for fn in cols.values()) + " |")


if __name__ == "__main__":
    main()
