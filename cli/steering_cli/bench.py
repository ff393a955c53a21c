"""`steer bench`: quality on the demo family, speed on random models, and vLLM's own `vllm bench`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path


def add_to(commands) -> None:
    bench = commands.add_parser("bench", help="measure quality (demo family) or speed (random models)")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    quality = bench_commands.add_parser("quality", help="skill transfer, abstention and decisions on the demo family")
    quality.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                         help="build (or reuse) the demo family of each seed and report each figure's mean and sd "
                              "(default: 0 1 2; about 12 minutes a family on 2 CPU cores)")
    quality.add_argument("--family", type=Path,
                         help="instead, one built demo family (`steer demo build`); the models only the benchmark "
                              "needs are added to it")
    quality.add_argument("--compare", type=Path, metavar="REPORT",
                         help="an earlier report over seeds (its quality.json, e.g. docs/bench/quality.json): say "
                              "which figures of this run fall outside its spread")
    perf = bench_commands.add_parser("perf", help="tokens/s and latency: vllm serve, steer serve, the reference")
    perf.add_argument("--preset", choices=["cpu", "cpu-hd64", "tiny", "gpu"], default="cpu",
                      help="model sizes (base ~10x experts); cpu-hd64: cpu's experts in half the heads, of 64 dims")
    perf.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16, 32],
                      help="levels; at each, at most this many requests in flight (the reference's batch size)")
    perf.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    perf.add_argument("--prompt-tokens", type=int, default=64)
    perf.add_argument("--max-tokens", type=int, default=64)
    perf.add_argument("--workload", choices=["equal", "mixed", "decisions", "router"], default="equal",
                      help="equal: --prompt-tokens in, --max-tokens out, all at once; mixed: lengths from --lengths, "
                           "arrivals at --rate; decisions: what yes/no decisions, claim checks and abstention scores "
                           "cost against plain steered calls, on one steered server; router: one steered replica "
                           "direct against vLLM's router in front of one and of two, over --rounds interleaved rounds")
    perf.add_argument("--rounds", type=_rounds, default=5,
                      help="equal, mixed, router: rounds in which every system is measured, interleaved (the order "
                           "reversed every other round); each ratio is reported as its median and spread over them "
                           "(fewer than 5 cannot resolve a few percent: 1 is for smoke runs)")
    perf.add_argument("--lengths", type=int, nargs=2, default=[16, 512], metavar=("MIN", "MAX"),
                      help="mixed: prompt and output lengths, each uniform in MIN..MAX tokens")
    perf.add_argument("--rate", type=float, default=float("inf"),
                      help="mixed: requests/s, Poisson arrivals (default inf: all at once)")
    perf.add_argument("--no-vllm-serve", dest="vllm_serve", action="store_false")
    perf.add_argument("--no-base-only", dest="base_only", action="store_false",
                      help="skip `steer serve` with a base-only deployment")
    perf.add_argument("--sharing", action="store_true",
                      help="also two pairs that share their untuned model, against the same with that model copied")
    perf.add_argument("--no-reference", dest="reference", action="store_false")
    perf.add_argument("--eager", action="store_true", help="no torch.compile (faster start, slower steps)")
    perf.add_argument("--block-size", type=int, help="KV cache block size for every server (default: vLLM's for the "
                      "platform, 128 on CPU); the prefix cache keeps whole blocks only")
    for command in (quality, perf):
        command.add_argument("--json", action="store_true", help="print the report as JSON")
        command.add_argument("--out", type=Path, help="write the JSON report and PNG plots into this folder")
    vllm = bench_commands.add_parser("vllm", help="vLLM's own `vllm bench` (e.g. `serve` against `steer serve`), which "
                                                  "the `vllm` script of the CPU build cannot start")
    vllm.add_argument("bench_type", help="`vllm bench`'s command: serve, latency, throughput, ...")
    vllm.add_argument("args", nargs=argparse.REMAINDER, help="its arguments, as `vllm bench` takes them")
    bench.set_defaults(handler=run)


def _rounds(text: str) -> int:
    rounds = int(text)
    if rounds < 1:
        raise argparse.ArgumentTypeError(f"at least 1 round, got {rounds}")
    return rounds


def run(args: argparse.Namespace) -> int:
    if args.bench_command == "vllm":
        from steering_tools.bench import vllm_bench

        return vllm_bench.main([args.bench_type, *args.args])
    if args.bench_command == "quality":
        from steering_tools.bench import quality as job

        if args.family and args.seeds:
            print("steer bench quality: give --family or --seeds, not both", file=sys.stderr)
            return 2
        try:  # before the run: a bad reference should not cost one
            reference = job.read_reference(args.compare) if args.compare else None
        except ValueError as error:
            print(f"steer bench quality: --compare: {error}", file=sys.stderr)
            return 2
        report = asyncio.run(job.run_family(args.family) if args.family else job.run_seeds(args.seeds or job.SEEDS))
        if reference is not None:
            report["comparison"] = job.compare(report, reference)
    elif args.workload == "router":
        from steering_tools.bench import router as job

        report = job.run(preset=args.preset, concurrency=tuple(args.concurrency), requests=args.requests,
                         prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, rounds=args.rounds,
                         eager=args.eager)
    else:
        from steering_tools.bench import perf as job

        report = job.run(preset=args.preset, concurrency=tuple(args.concurrency), requests=args.requests,
                         prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, workload=args.workload,
                         lengths=tuple(args.lengths), rate=args.rate, vllm_serve=args.vllm_serve,
                         base_only=args.base_only, sharing=args.sharing, reference=args.reference, eager=args.eager,
                         block_size=args.block_size, rounds=args.rounds)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.bench_command}.json").write_text(json.dumps(report, indent=2))
        if hasattr(job, "plot"):
            job.plot(report, args.out)
    print(json.dumps(report, indent=2) if args.json else job.summary(report))
    return 0
