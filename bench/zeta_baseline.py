#!/usr/bin/env python3
"""The Python baseline for bench/run_layer_bench.py: Zeta's published MultiQueryAttention (attn_impl='torch', the
only path of it that runs today), eager PyTorch, eval mode, same shapes, dtype and device as mqa-bench-layer.
This is what a user would build with Python and PyTorch. Prints JSON on stdout."""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference"))
from zeta_loader import load_zeta_mqa  # noqa: E402

CONFIGS = [("decode", 1, 1, 1024), ("decode", 1, 1, 8192), ("decode", 64, 1, 1024), ("decode", 64, 1, 8192),
           ("prefill", 1, 512, 0)]
QUICK = [("decode", 1, 1, 128), ("decode", 4, 1, 256), ("prefill", 1, 64, 0)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    gpu = args.device != "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.dtype or ("bfloat16" if gpu else "float32")]
    repeats = args.repeats or (200 if gpu else 5)
    mqa_cls, _ = load_zeta_mqa()
    torch.manual_seed(7)
    layer = mqa_cls(args.dim, args.heads, attn_impl="torch").to(args.device, dtype).eval()
    d = args.dim // args.heads
    rows = []
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    for kind, b, s, cache in (QUICK if args.quick else CONFIGS):
        x = torch.randn(b, s, args.dim, device=args.device, dtype=dtype)
        past = (torch.randn(b, 1, d, cache, device=args.device, dtype=dtype),
                torch.randn(b, 1, cache, d, device=args.device, dtype=dtype)) if cache else ()
        times = []
        with torch.no_grad():
            for r in range(-(20 if gpu else 1), repeats):
                sync()
                t0 = time.perf_counter()
                layer(x, past_key_value=past)
                sync()
                if r >= 0:
                    times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        med = statistics.median(times)
        rows.append({"kind": kind, "batch": b, "s": s, "cache": cache, "impl": "zeta-python", "median_ms": med,
                     "p90_ms": times[min(len(times) - 1, len(times) * 9 // 10)], "tokens_per_s": b * s / (med / 1e3),
                     "repeats": repeats})
    json.dump({"bench": "layer-zeta-baseline", "device": args.device, "dtype": str(dtype).replace("torch.", ""),
               "torch": torch.__version__, "rows": rows}, sys.stdout)


if __name__ == "__main__":
    main()
