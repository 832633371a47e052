#!/usr/bin/env python3
"""Golden data for mqa_client_golden_test, computed by PyTorch (independent of the client's conversions).

  make_golden.py --dir D            write D/golden.safetensors: "f32" values (random, specials, exact ties,
                                    half subnormals), PyTorch's "bf16" and "f16" of them, and "f16_as_f32"
  make_golden.py --dir D --verify   read D/ours.safetensors (written by the C++ test) with the safetensors
                                    package and check every tensor against the values the test used
"""
import argparse
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def golden_values(seed):
    g = torch.Generator().manual_seed(seed)
    parts = [
        torch.randn(4096, generator=g) * 10,
        torch.randn(2048, generator=g) * 1e-5,                       # around the float16 subnormals
        torch.rand(2048, generator=g) * 70000,                        # up to and past float16's max
        torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 65504.0, 65519.0, 65520.0,
                      2.0 ** -24, 2.0 ** -25, 1.5 * 2.0 ** -25, 3.4e38, -3.4e38, 1e-40]),
    ]
    # Exact ties for bfloat16: the low 16 bits are 0x8000, and both parities of the kept bit.
    bits = torch.randint(0, 2 ** 15, (1024,), generator=g, dtype=torch.int64) * 65536 + 0x3F000000 + 0x8000
    parts.append(torch.from_numpy(bits.to(torch.int32).numpy().view(np.float32).copy()))
    # Exact ties for float16: float16 midpoints in the normal range (low 13 mantissa bits 0x1000).
    half_bits = torch.randint(0x0400, 0x7BFF, (1024,), generator=g, dtype=torch.int64)
    f16 = torch.from_numpy(half_bits.to(torch.int16).numpy().view(np.float16).copy()).to(torch.float32)
    step = torch.from_numpy((half_bits + 1).to(torch.int16).numpy().view(np.float16).copy()).to(torch.float32)
    parts.append((f16.double() + step.double()).div(2).float())
    return torch.cat(parts).to(torch.float32).contiguous()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--verify", action="store_true")
    ap.add_argument("--seed", type=int, default=int(os.environ.get("MQA_TEST_SEED", "1234")))
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    if not args.verify:
        x = golden_values(args.seed)
        f16 = x.to(torch.float16)
        save_file({"f32": x, "bf16": x.to(torch.bfloat16), "f16": f16, "f16_as_f32": f16.to(torch.float32)},
                  os.path.join(args.dir, "golden.safetensors"))
        print(f"wrote {x.numel()} golden values (seed {args.seed}) to {args.dir}")
        return 0
    t = load_file(os.path.join(args.dir, "ours.safetensors"))
    # Single-precision steps, as the C++ test computes them (numpy float32 arithmetic: no FMA, no double).
    values = torch.from_numpy(np.arange(24, dtype=np.float32) * np.float32(0.37) - np.float32(3.0))
    expected = {
        "a_f32": values.reshape(2, 3, 4),
        "b_bf16": values.to(torch.bfloat16).reshape(4, 6),
        "c_f16": values.to(torch.float16),
        "d_mask": torch.tensor([[True, False], [False, True]]),
    }
    ok = set(t) == set(expected)
    for name, want in expected.items():
        got = t.get(name)
        if got is None or got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
            print(f"mismatch in {name}: got {got!r}, want {want!r}")
            ok = False
    print("ours.safetensors matches" if ok else "ours.safetensors differs")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
