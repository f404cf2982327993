"""The ``dynkv`` command line: ``env``, ``bench``, ``demo``, ``proxy``."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_env(args: argparse.Namespace) -> int:
    from dynkv.env import env_report

    report = env_report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for key, value in report.items():
        if key == "gpus":
            gpus = value if isinstance(value, list) else []
            print(f"{'gpus':<20}{len(gpus) or 'none seen'}")
            for i, g in enumerate(gpus):
                cc = g["compute_capability"]
                print(f"  [{i}] {g['name']}  sm_{cc}  {g['num_sms']} SMs  {g['total_memory'] / 2**30:.0f} GiB")
        else:
            print(f"{key:<20}{value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynkv", description="KV-cache block manager for vLLM")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("env", help="versions, CUDA ops compiled in, GPUs seen")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(func=_cmd_env)
    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    from dynkv.benchmarks import kernels as bench_kernels

    k = bsub.add_parser(
        "kernels",
        help="copy-kernel GB/s vs contiguous memcpy: table, JSON, PNG",
        description=bench_kernels.DESCRIPTION,
    )
    bench_kernels.add_arguments(k)
    k.set_defaults(func=bench_kernels.run_from_args)
    from dynkv.benchmarks import disk as bench_disk

    d = bsub.add_parser("disk", help="disk tier GB/s vs dd with O_DIRECT: table, JSON",
                        description=bench_disk.DESCRIPTION)
    bench_disk.add_arguments(d)
    d.set_defaults(func=bench_disk.run_from_args)
    from dynkv.benchmarks import shared as bench_shared

    h = bsub.add_parser("shared", help="shared tier GB/s vs the store's own batched put/get: table, JSON",
                        description=bench_shared.DESCRIPTION)
    bench_shared.add_arguments(h)
    h.set_defaults(func=bench_shared.run_from_args)
    from dynkv.benchmarks import demo
    from dynkv.benchmarks import serve as bench_serve

    s = bsub.add_parser("serve", help="multi-turn TTFT against OpenAI-compatible servers: table, JSON, PNG",
                        description=bench_serve.DESCRIPTION)
    bench_serve.add_arguments(s)
    s.set_defaults(func=bench_serve.run_from_args)
    from dynkv.benchmarks.e2e import run as bench_e2e

    x = bsub.add_parser("e2e", help="TTFT per tier inside vLLM (offline API) vs vLLM's own caches: table, JSON, PNG",
                        description=bench_e2e.DESCRIPTION)
    bench_e2e.add_arguments(x)
    x.set_defaults(func=bench_e2e.run_from_args)
    from dynkv.benchmarks.load import run as bench_load

    lo = bsub.add_parser("load", help="multi-turn conversations under a closed loop: plain vLLM, dynkv, offloading; "
                                      "table, JSON, PNG", description=bench_load.DESCRIPTION)
    bench_load.add_arguments(lo)
    lo.set_defaults(func=bench_load.run_from_args)
    m = sub.add_parser("demo", help="vLLM without and with dynkv on a multi-turn workload",
                       description=demo.DESCRIPTION)
    demo.add_arguments(m)
    m.set_defaults(func=demo.run_from_args)
    from dynkv import status

    t = sub.add_parser("status", help="each tier's health, capacity and use in running engines",
                       description=status.DESCRIPTION)
    status.add_arguments(t)
    t.set_defaults(func=status.run_from_args)
    from dynkv.proxy import server as proxy

    x = sub.add_parser("proxy", help="OpenAI-compatible proxy over prefill and decode engines, or routing over "
                       "N aggregated engines", description=proxy.DESCRIPTION)
    proxy.add_arguments(x)
    x.set_defaults(func=proxy.run_from_args)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
