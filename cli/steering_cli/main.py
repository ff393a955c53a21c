"""`steer`: try a policy, serve a deployment, reload its policies, calibrate a policy, run the demo and the
benchmarks."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path


def _alpha_override(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected PAIR=VALUE, got {text!r}")
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"alpha for {name!r} is not a number: {value!r}") from None


BUILD_MINUTES = "about 10 minutes"  # measured on 2 cores: README, "The demo family"
TOOLS_EXTRA = {"scipy", "matplotlib", "tqdm"}  # what the tools need beyond serving (pyproject's `tools`)
NO_CONFIG = """steer serve: --config is required: the deployment YAML to serve (see README, "The deployment config").
To serve the demo family instead: `steer demo run` (it trains the family once, about 10 minutes on 2 CPU
cores, then serves it on :8000), or `steer demo build` and then `steer serve --config <that folder>/deploy.yaml`."""


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steer", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="show vLLM's own logs")
    commands = parser.add_subparsers(dest="command", required=True)

    complete = commands.add_parser("complete", help="answer one prompt under one or more policies, as the server "
                                   "would: decision policies decide, abstention policies may abstain")
    complete.add_argument("--config", required=True, type=Path, help="deployment YAML")
    complete.add_argument(
        "--policy", action="append", required=True,
        help="policy name; repeat to compare policies on one engine",
    )
    complete.add_argument(
        "--alpha", action="append", type=_alpha_override, default=[], metavar="PAIR=VALUE",
        help="override a pair's alpha (within the policy's max_alpha)",
    )
    complete.add_argument("--max-tokens", type=int, default=32)
    complete.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    complete.add_argument("--seed", type=int, default=None)
    complete.add_argument("--chat", action="store_true", help="send PROMPT as a user message")
    complete.add_argument("--claim", help="claim-check policies: the answer to PROMPT to check "
                          "(mind the leading space)")
    complete.add_argument("--json", action="store_true", help="print one JSON object per policy")
    complete.add_argument("prompt")
    complete.set_defaults(handler=lambda args: asyncio.run(_complete(args)))

    serve = commands.add_parser("serve", help="serve a deployment over an OpenAI-compatible HTTP API")
    serve.add_argument("--config", type=Path, help="deployment YAML (required; `steer demo run` serves the demo)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("STEER_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1 routes (default: $STEER_API_KEY)")
    serve.add_argument("--watch-config", type=_seconds, metavar="SECONDS",
                       help="re-read the config every SECONDS and reload when it (or a calibration file it names) "
                            "changed, e.g. a mounted ConfigMap (default: reload only on SIGHUP or POST)")
    serve.add_argument("--max-body-bytes", type=int, help="refuse a larger request body with 413 (default: 16 MiB)")
    serve.set_defaults(handler=_serve)

    check = commands.add_parser(
        "check", help="check a deployment config as `steer serve` does on this machine, without starting an engine"
    )
    check.add_argument("--config", required=True, type=Path, help="deployment YAML")
    check.set_defaults(handler=_check)

    calibrate = commands.add_parser(
        "calibrate", help="fit a decision or abstention policy's calibration from labelled JSONL"
    )
    calibrate.add_argument("--config", required=True, type=Path, help="deployment YAML")
    calibrate.add_argument("--policy", required=True)
    calibrate.add_argument("--data", required=True, type=Path,
                           help='JSONL rows: {"prompt" | "messages", "label" | "answer"}')
    calibrate.add_argument("--out", type=Path, help="calibration file (default: <config dir>/<policy>.calibration.json)")
    calibrate.add_argument("--seed", type=int, default=0, help="seed of the fit / held-out split")
    calibrate.add_argument("--fit-fraction", type=float, default=0.5)
    calibrate.add_argument("--max-tokens", type=int, default=32, help="answer length for abstention policies")
    calibrate.add_argument("--bins", type=int, default=10, help="confidence bins for ECE and the reliability plot")
    calibrate.add_argument("--apply", action="store_true",
                           help="replace the calibration file the policy names in the config, then reload the "
                                "server at --url: the recalibrated policy serves from its next request")
    _server_arguments(calibrate)
    calibrate.set_defaults(handler=lambda args: asyncio.run(_calibrate(args)))

    reload = commands.add_parser(
        "reload", help="have a running server re-read its config: policies change, in-flight requests finish as they began"
    )
    _server_arguments(reload)
    reload.add_argument("--json", action="store_true", help="print the server's report as JSON")
    reload.set_defaults(handler=_reload)

    demo = commands.add_parser("demo", help="the demo family: build it, or serve it and show each policy")
    demo_commands = demo.add_subparsers(dest="demo_command", required=True)
    demo_build = demo_commands.add_parser("build", help="train and calibrate the demo family (cached)")
    demo_build.add_argument("--out", type=Path, help="folder (default: a cache folder named by the recipe)")
    demo_build.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
    demo_run = demo_commands.add_parser("run", help="build if missing, serve in the background, send examples")
    demo_run.add_argument("--port", type=int, default=8000)
    demo.set_defaults(handler=_demo)

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
    perf.add_argument("--preset", choices=["cpu", "tiny", "gpu"], default="cpu", help="model sizes (base ~10x experts)")
    perf.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16, 32],
                      help="levels; at each, at most this many requests in flight (the reference's batch size)")
    perf.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    perf.add_argument("--prompt-tokens", type=int, default=64)
    perf.add_argument("--max-tokens", type=int, default=64)
    perf.add_argument("--workload", choices=["equal", "mixed", "decisions"], default="equal",
                      help="equal: --prompt-tokens in, --max-tokens out, all at once; mixed: lengths from --lengths, "
                           "arrivals at --rate; decisions: what yes/no decisions, claim checks and abstention scores "
                           "cost against plain steered calls, on one steered server")
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
    bench.set_defaults(handler=_bench)

    fixtures = commands.add_parser("fixtures", help="build a tiny random model family and its deploy.yaml")
    fixtures.add_argument("--out", required=True, type=Path)
    fixtures.add_argument("--family", choices=["llama", "qwen2"], default="llama")
    fixtures.set_defaults(handler=_fixtures)
    return parser


def _server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("STEER_BASE_URL", "http://127.0.0.1:8000/v1"),
                        help="the server, as the SDK's base URL (default: $STEER_BASE_URL, else "
                             "http://127.0.0.1:8000/v1)")
    parser.add_argument("--api-key", default=os.environ.get("STEER_API_KEY"),
                        help="the server's API key (default: $STEER_API_KEY)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # stdout is the command's output (e.g. --json); logs go to stderr.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    # vLLM's V1 model runner, unless the operator chose: the V2 processor class has not yet run
    # where a GPU was lent, and CPUs run V1 anyway (Model Runner V2 needs Triton).
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    if not args.verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from steering.errors import SteeringError

    try:
        return args.handler(args)
    except SteeringError as error:
        print(f"steer: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        if error.name not in TOOLS_EXTRA:
            raise
        print(f"steer {args.command}: needs the `tools` extra ({error.name} is missing): "
              "pip install 'steering-service[tools]'", file=sys.stderr)
        return 2


# What `steer complete` calls the request fields it sets, for its errors.
_COMPLETE_FLAGS = {"steering.alpha": "--alpha", "steering.claim": "--claim"}


async def _complete(args) -> int:
    """Each policy answers the prompt as the server would: through its own planning and policy
    kinds, so a decision policy decides and an abstention policy may abstain."""
    from transformers import AutoTokenizer

    from steering.config import load_deployment
    from steering.engine import SteeringEngine
    from steering.errors import RequestError
    from steering.policy import Overrides, Policies
    from steering_server.metrics import ServerMetrics
    from steering_server.protocol import ChatCompletionRequest, CompletionRequest
    from steering_server.service import ChatCompletions, Completions

    deployment = load_deployment(args.config)
    tokenizer = AutoTokenizer.from_pretrained(deployment.base)
    policies = Policies.build(deployment, lambda text: tokenizer.encode(text, add_special_tokens=False))
    overrides = {"alpha": dict(args.alpha) or None, "claim": args.claim}
    for name in args.policy:  # refused before an engine starts, naming the flag
        try:
            policies[name].resolve(Overrides(**overrides))
        except RequestError as error:
            flag = next((flag for field, flag in _COMPLETE_FLAGS.items() if (error.param or "").startswith(field)), None)
            raise RequestError(f"{error} ({flag})" if flag else str(error), param=error.param) from None
    steering = {key: value for key, value in overrides.items() if value is not None} or None
    engine = SteeringEngine.start(deployment)
    try:
        service = (ChatCompletions if args.chat else Completions)(engine, ServerMetrics(set(deployment.policies)))
        for name in args.policy:
            body = {"model": name, "max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed,
                    "steering": steering}
            body |= {"messages": [{"role": "user", "content": args.prompt}]} if args.chat else {"prompt": args.prompt}
            request = (ChatCompletionRequest if args.chat else CompletionRequest).model_validate_json(json.dumps(body))
            plan = service.plan(request)
            (answer,), outcome = await service.answer(plan)
            info = outcome.steering
            if args.json:
                print(json.dumps({
                    "policy": name,
                    "alpha": info.alpha,
                    "text": answer.text,
                    "token_ids": list(answer.token_ids),
                    "prompt_token_ids": list(plan.prompts[0]),
                    "finish_reason": answer.finish_reason,
                    "steering": info.model_dump(exclude_none=True),
                }))
            else:
                shown = ", ".join(f"{pair}={value:g}" for pair, value in info.alpha.items()) or "unsteered"
                print(f"[{name}: {shown}]\n{answer.text}\n{_judgement(info)}")
    finally:
        engine.shutdown()
    return 0


def _judgement(info) -> str:
    """What a decision or abstention policy decided, and on what, in a line (blank for plain policies)."""
    if info.decision is not None:
        calibrated = ", ".join(f"{label!r} {p:.3f}" for label, p in info.decision["calibrated"].items())
        costs = ", ".join(f"{action!r} {cost:.3f}" for action, cost in info.decision["expected_costs"].items())
        return f"(decided {info.decision['action']!r}: p {calibrated}; expected costs {costs})\n"
    if info.abstention is not None:
        report = info.abstention
        verdict = "abstained" if info.abstained else "answered"
        return (f"({verdict}: {report['score']} {report['raw']:.3f}, calibrated {report['confidence']:.3f}, "
                f"threshold {report['threshold']:.3f})\n")
    return ""


def _serve(args) -> int:
    import logging

    import uvicorn

    from steering_server.app import ServerSettings, create_app

    if args.config is None:
        print(NO_CONFIG, file=sys.stderr)
        return 2
    if args.api_key == "":  # e.g. a Secret with an empty value: refuse rather than guard with ""
        print("steer serve: the API key (--api-key or STEER_API_KEY) is empty; set one, or unset it to serve "
              "without a key", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ServerSettings(config=args.config, host=args.host, port=args.port, api_key=args.api_key,
                              watch_config_seconds=args.watch_config,
                              **({"max_body_bytes": args.max_body_bytes} if args.max_body_bytes else {}))
    logging.getLogger("steer.server").info("loading the deployment from %s", args.config)
    if args.api_key is None:
        logging.getLogger("steer.server").warning(
            "no API key (--api-key or STEER_API_KEY): anyone who reaches %s can use every policy", settings.address)
    failures: list[BaseException] = []

    def stop(error: BaseException) -> None:
        failures.append(error)
        server.should_exit = True

    app = create_app(settings, on_engine_failure=stop)
    server = uvicorn.Server(uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level="info",
        timeout_graceful_shutdown=settings.graceful_shutdown_seconds,
    ))
    server.run()
    return 1 if failures else 0


async def _calibrate(args) -> int:
    from steering.config import load_deployment
    from steering.errors import ConfigError
    from steering_tools import rollout
    from steering_tools.calibrate import calibrate, summary

    deployment = load_deployment(args.config, calibrating=True)
    out = args.out or args.config.parent / f"{args.policy}.calibration.json"
    if args.apply:  # refused before any engine starts
        named = rollout.named_calibration(args.config, args.policy)
        if args.out and args.out.resolve() != named:
            raise ConfigError("--out", f"--apply replaces the file policies.{args.policy}.calibration names "
                                       f"({named}); leave out --out")
        out = named
    previous = out.read_bytes() if args.apply and out.exists() else None
    result = await calibrate(deployment, args.policy, args.data, out, seed=args.seed,
                             fit_fraction=args.fit_fraction, max_tokens=args.max_tokens, bins=args.bins)
    print(summary(result))
    if not args.apply:
        print(f"to use it, set `calibration: {out}` in policies.{args.policy} of {args.config}, then "
              "`steer reload` (or rerun with --apply)")
        return 0
    rollout.keep_if_valid(args.config, out, previous)
    try:
        report = rollout.reload_server(args.url, args.api_key, caller="steer calibrate --apply")
    except rollout.ReloadFailed as error:
        print(f"steer calibrate: wrote {out}, but {error}; the server serves the old calibration until it "
              "reloads (`steer reload`, or SIGHUP)", file=sys.stderr)
        return 1
    print(rollout.describe(report))
    return 0


def _check(args) -> int:
    """What `steer serve` checks before its engine starts: the YAML, calibration files, checkpoints
    (configs and tokenizers, not weights), the executor, and vLLM's engine config (on CPU, the KV
    cache against this machine's memory). A refusal exits 2, naming the field, as serve does."""
    from steering.config import digest, load_deployment
    from steering.engine import engine_config

    deployment = load_deployment(args.config)
    kv_cache = engine_config(deployment).cache_config.kv_cache_memory_bytes
    print(f"{args.config}: ok, config {digest(deployment)}")
    print(f"  base: {deployment.base}")
    for name, pair in deployment.experts.items():
        print(f"  expert pair {name}: {pair.tuned} - {pair.untuned}")
    print(f"  policies: {', '.join(deployment.policies)}")
    if kv_cache is not None:
        print(f"  KV cache: {kv_cache / 2**30:.3f} GiB per worker")
    return 0


def _reload(args) -> int:
    from steering_tools import rollout

    try:
        report = rollout.reload_server(args.url, args.api_key)
    except rollout.ReloadFailed as error:
        print(f"steer reload: {error}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else rollout.describe(report))
    return 0


def _demo_family(out: Path | None = None, force: bool = False) -> Path:
    from steering_tools.demo_family import Recipe, build, default_dir, is_built

    recipe = Recipe()
    folder = out or default_dir(recipe)
    if force or not is_built(folder, recipe):
        print(f"building the demo family in {folder} ({BUILD_MINUTES} on 2 CPU cores; each finished stage "
              "is kept, so an interrupted build resumes)", flush=True)
    return asyncio.run(build(folder, recipe=recipe, force=force))


def _demo(args) -> int:
    if args.demo_command == "build":
        print(f"the demo family is ready in {_demo_family(args.out, args.force)}")
        return 0
    from steering_tools.demo import run

    return run(_demo_family(), args.port)


def _bench(args) -> int:
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
    else:
        from steering_tools.bench import perf as job

        report = job.run(preset=args.preset, concurrency=tuple(args.concurrency), requests=args.requests,
                         prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, workload=args.workload,
                         lengths=tuple(args.lengths), rate=args.rate, vllm_serve=args.vllm_serve,
                         base_only=args.base_only, sharing=args.sharing, reference=args.reference, eager=args.eager,
                         block_size=args.block_size)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.bench_command}.json").write_text(json.dumps(report, indent=2))
        if hasattr(job, "plot"):
            job.plot(report, args.out)
    print(json.dumps(report, indent=2) if args.json else job.summary(report))
    return 0


def _fixtures(args) -> int:
    from steering_tools.fixtures import (
        LLAMA_FAMILY,
        QWEN2_FAMILY,
        build_family,
        write_deployment,
    )

    spec = {"llama": LLAMA_FAMILY, "qwen2": QWEN2_FAMILY}[args.family]
    family = build_family(spec, args.out)
    path = write_deployment(family, args.out / "deploy.yaml")
    print(f"wrote the {args.family} fixture family and {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
