#!/usr/bin/env python3
"""Runs the layer benchmark on every device here: mqa-bench-layer (the C++ layer per attn_impl, with the memory
floor measured in the same run) and, in the same run, the Python baseline (Zeta's module in eager PyTorch,
bench/zeta_baseline.py). Prints one table per device and writes everything to JSON.

Usage: run_layer_bench.py [--build build/release] [--out bench/results] [--quick] [--devices cpu,cuda]"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(HERE, "..", "build", "release"))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    ap.add_argument("--devices", default=None, help="comma list; default: cpu, plus cuda when present")
    args = ap.parse_args()
    import torch  # only to learn whether CUDA is here; the timing happens in the two programs
    devices = args.devices.split(",") if args.devices else (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    os.makedirs(args.out, exist_ok=True)
    report = {"host": platform.node(), "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "runs": []}
    for dev in devices:
        cpp_json = os.path.join(args.out, f"layer-cpp-{dev}.json")
        cmd = [os.path.join(args.build, "bench", "mqa-bench-layer"), "--device", dev, "--json", cpp_json]
        if args.quick:
            cmd.append("--quick")
        subprocess.run(cmd, check=True)
        with open(cpp_json) as fh:
            cpp = json.load(fh)
        base_cmd = [sys.executable, os.path.join(HERE, "zeta_baseline.py"), "--device", dev, "--dtype", cpp["dtype"],
                    "--dim", str(cpp["dim"]), "--heads", str(cpp["heads"])]
        if args.quick:
            base_cmd.append("--quick")
        zeta = json.loads(subprocess.run(base_cmd, check=True, capture_output=True, text=True).stdout)
        key = lambda r: (r["kind"], r["batch"], r["s"], r["cache"])  # noqa: E731
        base = {key(r): r for r in zeta["rows"]}
        print(f"\n== layer forward on {dev}: {cpp['card']}, {cpp['dtype']}, dim {cpp['dim']}, heads {cpp['heads']}; "
              f"copy bandwidth {cpp['copy_gbps']:.0f} GB/s (measured in this run); baseline: Zeta in eager PyTorch "
              f"{zeta['torch']}")
        print(f"{'kind':8} {'batch':>5} {'s':>4} {'cache':>6} {'impl':12} {'median_ms':>10} {'tokens/s':>11} "
              f"{'floor_ms':>9} {'x_floor':>8} {'vs_zeta':>8}")
        for r in cpp["rows"] + zeta["rows"]:
            b = base.get(key(r))
            floor = next((c["floor_ms"] for c in cpp["rows"] if key(c) == key(r)), None)
            r["floor_ms"] = floor
            r["speedup_vs_zeta"] = b["median_ms"] / r["median_ms"] if b else None
        for r in sorted(cpp["rows"] + zeta["rows"], key=lambda r: (key(r), r["impl"])):
            print(f"{r['kind']:8} {r['batch']:>5} {r['s']:>4} {r['cache']:>6} {r['impl']:12} {r['median_ms']:>10.3f} "
                  f"{r['tokens_per_s']:>11.1f} {r['floor_ms']:>9.3f} {r['median_ms'] / r['floor_ms']:>8.2f} "
                  f"{r['speedup_vs_zeta']:>7.2f}x")
        report["runs"].append({"device": dev, "cpp": cpp, "zeta_baseline": zeta})
    path = os.path.join(args.out, "layer-bench.json")
    with open(path, "w") as fh:
        json.dump(report, fh, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
