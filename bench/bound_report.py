#!/usr/bin/env python3
"""The engine and the service against the speed of their kernels, from the JSON of one run: the bound is the
graph-replayed layer step of mqa-bench-kernels (--layer-only --batches N,... --lengths L) at B = N sessions,
times the model's layers: N tokens every layers x step_us. Beside it the in-process engine (mqa-bench-engine,
batched rows, and waves rows when run) as a share of that bound, and each service run (mqa-cli bench) as a share of the engine in
process at the same N. Prints one table and writes it as JSON.

Usage: bound_report.py --kernels K.json --engine E.json [--service NAME=S.json ...] [--length L] [--json OUT]

Standard library only."""
import argparse
import json
import sys


def load(path):
    with open(path) as fh:
        return json.load(fh)


def layer_step_us(kernels, length):
    """B -> the graph-replayed triton layer step in microseconds at the given L (the nearest L measured)."""
    rows = [r for r in kernels["rows"] if r.get("part") == "layer_step" and r.get("impl") == "triton, CUDA graph"]
    if not rows:
        sys.exit("bound_report: the kernels JSON has no graph-replayed layer step rows")
    best = {}
    for r in rows:
        b, dist = r["B"], abs(r["L"] - length)
        if b not in best or dist < best[b][0]:
            best[b] = (dist, r["us"], r["L"])
    return {b: (us, lval) for b, (_, us, lval) in best.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", required=True)
    ap.add_argument("--engine", required=True)
    ap.add_argument("--service", action="append", default=[], metavar="NAME=FILE")
    ap.add_argument("--length", type=int, default=0,
                    help="L for the bound (default: prefill + warm-up + half the decode tokens of the engine run)")
    ap.add_argument("--json")
    args = ap.parse_args()
    kernels, engine = load(args.kernels), load(args.engine)
    layers = engine["layers"]
    length = args.length or engine["prefill"] + engine["warmup"] + engine["tokens"] // 2
    steps = layer_step_us(kernels, length)
    batched = {r["sessions"]: r for r in engine["rows"] if r["mode"] == "batched"}
    waves = {r["sessions"]: r for r in engine["rows"] if r["mode"] == "waves"}
    services = []
    for spec in args.service:
        name, _, path = spec.partition("=")
        data = load(path)
        services.append((name, {r["sessions"]: r for r in data["rows"]}))

    print(f"card: {kernels.get('card', '?')}; {engine.get('dtype')} dim {engine.get('dim')}, {layers} layers, "
          f"{engine.get('attn_impl')}; bound at L={length} (nearest measured L shown)")
    head = f"{'N':>5} {'step_us':>8} {'L':>5} {'bound tok/s':>12} {'engine tok/s':>13} {'of bound':>9}"
    if waves:
        head += f" {'waves tok/s':>12} {'of bound':>9}"
    for name, _ in services:
        head += f" {name + ' tok/s':>22} {'of engine':>9}"
    print(head)
    out_rows = []
    for n in sorted(batched):
        e = batched[n]["tokens_per_s"]
        row = {"sessions": n, "engine_tokens_per_s": e}
        line = f"{n:>5}"
        if n in steps:
            us, lval = steps[n]
            bound = n * 1e6 / (layers * us)
            row.update(layer_step_us=us, bound_L=lval, bound_tokens_per_s=bound, engine_of_bound=e / bound)
            line += f" {us:>8.1f} {lval:>5} {bound:>12.0f} {e:>13.0f} {100 * e / bound:>8.1f}%"
        else:
            line += f" {'-':>8} {'-':>5} {'-':>12} {e:>13.0f} {'-':>9}"
        if waves:
            w = waves.get(n, {}).get("tokens_per_s")
            if w is not None and "bound_tokens_per_s" in row:
                row["waves_tokens_per_s"] = w
                row["waves_of_bound"] = w / row["bound_tokens_per_s"]
                line += f" {w:>12.0f} {100 * w / row['bound_tokens_per_s']:>8.1f}%"
            else:
                line += f" {'-':>12} {'-':>9}"
        for name, rows in services:
            s = rows.get(n, {}).get("tokens_per_s")
            if s is None:
                line += f" {'-':>22} {'-':>9}"
                continue
            row[name + "_tokens_per_s"] = s
            row[name + "_of_engine"] = s / e if e else None
            line += f" {s:>22.0f} {100 * s / e:>8.1f}%"
        out_rows.append(row)
        print(line)
    print("(bound: N tokens per layers x step_us, the graph-replayed layer step of mqa-bench-kernels at B = N; "
          "engine: mqa-bench-engine batched, in process; waves: its SubmitSteps per layer mode; services: mqa-cli bench over loopback, same run)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"card": kernels.get("card"), "layers": layers, "length": length, "rows": out_rows}, fh,
                      indent=1)


if __name__ == "__main__":
    main()
