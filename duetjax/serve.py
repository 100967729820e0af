"""``python -m duetjax.serve``: an OpenAI-compatible HTTP server.

    python -m duetjax.serve                                  # the embedded SmolLM2-135M-Instruct
    python -m duetjax.serve --model ./Llama-3.2-1B-Instruct --port 8000 --api-key sk-local
    python -m duetjax.serve --model ./Qwen2.5-1.5B-Instruct --tool-call-parser hermes
    python -m duetjax.serve --model ./Qwen3-1.7B --reasoning-parser qwen3 --tool-call-parser hermes

Binds to 127.0.0.1 unless --host says otherwise, and prints
``duetjax serving MODEL on http://HOST:PORT`` once it accepts connections. Sampling fields a
request leaves out (temperature, top_p, top_k, min_p, repetition_penalty, max_tokens) take the
model's defaults, as vLLM's server does (see --generation-config), not OpenAI's. On SIGTERM (or
Ctrl-C) it drains: it stops accepting, lets requests in flight finish for up to
--drain-timeout seconds, aborts the rest, and exits 0. A second Ctrl-C cuts the drain short:
requests still in flight are aborted at once, and it exits 130.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from .async_engine import AsyncEngine, ServingEngine
from .cli import (LOAD_FORMAT_HELP, add_data_parallel_flag, add_generation_config_flag,
                  add_quantization_flags, add_tensor_parallel_flag, quantization_options,
                  start_error, tensor_parallel_options)
from .data_parallel import DataParallelEngine, ReplicaStartError
from .data_parallel.engine import check_config, local_replicas
from .data_parallel.hosts import (CLUSTER_KEY_ENV, Cluster, FrontHosts, cluster_key, join,
                                  serve_host)
from .engine import Engine
from .gc_pauses import freeze_startup_heap, gc_pauses
from .server import create_app
from .server.reasoning import REASONING_PARSERS
from .server.tool_parsers import TOOL_PARSERS

log = logging.getLogger("duetjax.serve")

MODES = ("aggregated", "duet", "auto")
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
FORCED_EXIT_STATUS = 130
"""The exit status after a second Ctrl-C cut the drain short (128 + SIGINT, the shell's)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m duetjax.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="Hugging Face directory, .gguf file or Orbax checkpoint directory "
                        "(default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--served-model-name", default=None,
                   help="the name clients put in 'model' (default: the model's directory or file name)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: no key)")
    p.add_argument("--mode", choices=MODES, default="aggregated",
                   help="aggregated: one mixed prefill+decode batch on the whole GPU; duet: split "
                        "the GPU's SMs between prefill and decode when the TBT SLO needs it; "
                        "auto: duet where available")
    p.add_argument("--tbt-slo-ms", type=float, default=None,
                   help="time-between-tokens SLO, ms. Aggregated mode: each iteration's token "
                        "budget is the largest (up to --max-num-batched-tokens) predicted to fit "
                        "it (needs a device profile); unset: the fixed budget. Duet mode: the SLO "
                        "it splits to protect (default 50)")
    p.add_argument("--slo-ttft-ms", type=float, default=None,
                   help="with --tbt-slo-ms: the time to first token the budget keeps pace for, "
                        "taking a larger budget past the TBT SLO when the one that fits computes "
                        "prompts too slowly for the waiting ones to be served in time; unset: the "
                        "TBT SLO alone decides")
    p.add_argument("--slo-min-prefill-tokens", type=int, default=None,
                   help="with --tbt-slo-ms: prompt tokens each mixed step computes at least, "
                        "whatever the prediction (default 256)")
    p.add_argument("--duet-pairs", default=None,
                   help="prefill:decode SM percentages of the duet worker pairs, e.g. 70:30,50:50")
    p.add_argument("--duet-policy", choices=("adaptive", "static"), default=None,
                   help="adaptive: split when the SLO needs it (DuetServe); static: split every "
                        "mixed iteration at the first pair (a baseline)")
    p.add_argument("--device-profile", default=None,
                   help="roofline profile JSON for duet mode and --tbt-slo-ms (default: the shipped one of this GPU; "
                        "make one with tools/calibrate.py)")
    e = p.add_argument_group("engine")
    e.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    e.add_argument("--load-format", default="auto", help=LOAD_FORMAT_HELP)
    add_quantization_flags(e)
    add_tensor_parallel_flag(e)
    add_data_parallel_flag(e)
    e.add_argument("--max-num-seqs", type=int, default=None, help="most sequences per step")
    e.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget per step")
    e.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output")
    e.add_argument("--kv-cache-tokens", type=int, default=None, help="KV pool capacity in tokens")
    e.add_argument("--page-size", type=int, default=None, help="tokens per KV page")
    e.add_argument("--seed", type=int, default=None, help="seeds requests that bring no seed")
    add_generation_config_flag(e)
    s = p.add_argument_group("server")
    s.add_argument("--max-queued-requests", type=int, default=256,
                   help="requests that may wait beyond --max-num-seqs; past that, 429 + Retry-After")
    s.add_argument("--max-body-bytes", type=int, default=4 * 2**20,
                   help="largest request body; larger ones get a 413 (default 4 MiB)")
    s.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds requests in flight may take to finish (default 30)")
    s.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    s.add_argument("--no-access-log", action="store_true", help="do not log every HTTP request")
    t = p.add_argument_group("tool calling (vLLM's flags)")
    t.add_argument("--tool-call-parser", choices=sorted(TOOL_PARSERS), default=None,
                   help="how the model writes tool calls: hermes (Hermes, Qwen2.5, Qwen3: "
                        "<tool_call>{...}</tool_call>) or llama3_json (Llama 3.1/3.2 JSON calls); "
                        "enables tool_choice 'auto' (without it, requests with tools need "
                        "tool_choice 'none')")
    t.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="vLLM's switch for tool_choice 'auto'; accepted so vLLM command lines "
                        "work (needs --tool-call-parser, which alone enables it here)")
    t.add_argument("--exclude-tools-when-tool-choice-none", action="store_true",
                   help="with tool_choice 'none', leave the tools out of the prompt (default: "
                        "the chat template still renders them, and nothing is parsed)")
    h = p.add_argument_group("several hosts (tensor parallelism within a host, data "
                             "parallelism across hosts; the same command on every host but "
                             f"--host-rank, the shared secret in {CLUSTER_KEY_ENV})")
    h.add_argument("--coordinator-address", default=None, metavar="HOST0:PORT",
                   help="host 0's address and a free port: the cluster's rendezvous (JAX's "
                        "coordination service); host 0 binds it and its relay listener there")
    h.add_argument("--num-hosts", type=int, default=1, metavar="H",
                   help="hosts serving together; host 0 runs the HTTP front over every host's "
                        "--data-parallel-size replicas (default 1)")
    h.add_argument("--host-rank", type=int, default=0, metavar="R",
                   help="this host's rank, 0 to H-1 (default 0)")
    p.add_argument("--reasoning-parser", choices=sorted(REASONING_PARSERS), default=None,
                   help="move the model's <think> reasoning into reasoning_content in chat "
                        "responses (vLLM's flag): qwen3 or deepseek_r1")
    args = p.parse_args(argv)
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        p.error("--enable-auto-tool-choice needs --tool-call-parser "
                f"({'|'.join(sorted(TOOL_PARSERS))}): it says how the model writes its calls")
    return args


def cluster_of(args: argparse.Namespace) -> Cluster | None:
    """Where this host stands among --num-hosts (None: it serves alone); ValueError names the
    flag (or the environment variable) that is wrong."""
    if args.num_hosts < 1:
        raise ValueError(f"--num-hosts must be >= 1, got {args.num_hosts}")
    if not 0 <= args.host_rank < args.num_hosts:
        raise ValueError(f"--host-rank must be in [0, {args.num_hosts}) (--num-hosts "
                         f"{args.num_hosts}), got {args.host_rank}")
    if args.num_hosts == 1:
        if args.coordinator_address is not None:
            raise ValueError("--coordinator-address needs --num-hosts > 1")
        return None
    address = args.coordinator_address
    if address is None:
        raise ValueError(f"--num-hosts {args.num_hosts} needs --coordinator-address HOST0:PORT")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator-address wants HOST0:PORT, got {address!r}")
    return Cluster(address, args.num_hosts, args.host_rank, cluster_key())


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The EngineConfig fields given on the command line, plus the mode if the engine knows it."""
    names = ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "kv_cache_tokens",
             "page_size", "seed")
    options = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    options["mode"] = args.mode
    options["generation_config"] = args.generation_config
    options.update(quantization_options(args))
    options.update(tensor_parallel_options(args))
    for name in ("tbt_slo_ms", "slo_ttft_ms", "slo_min_prefill_tokens", "duet_policy",
                 "device_profile"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.duet_pairs:
        try:
            options["duet_pairs"] = tuple(tuple(int(x) for x in pair.split(":"))
                                          for pair in args.duet_pairs.split(","))
        except ValueError:
            raise SystemExit(f"error: --duet-pairs wants PREFILL:DECODE percentages separated by "
                             f"commas, e.g. 70:30,50:50; got {args.duet_pairs!r}") from None
    return options


def start_engine(args: argparse.Namespace, cluster: Cluster | None = None) -> ServingEngine:
    """The engine the command line asks for: one Engine on a thread of this process, or
    ``--data-parallel-size`` replica processes (with every host's, on host 0 of a cluster)."""
    options = engine_options(args)
    if args.data_parallel_size != 1 or cluster is not None:
        return DataParallelEngine(args.model, data_parallel_size=args.data_parallel_size,
                                  dtype=args.dtype, load_format=args.load_format,
                                  max_queued_requests=args.max_queued_requests,
                                  hosts=None if cluster is None else FrontHosts(cluster),
                                  replica_timeout=args.replica_timeout_s or None, **options)
    engine = Engine(args.model, dtype=args.dtype, load_format=args.load_format, **options)
    return AsyncEngine(engine, max_queued_requests=args.max_queued_requests)


def serve_replicas(args: argparse.Namespace, cluster: Cluster) -> int:
    """Host R > 0: its replicas, relayed to host 0's front until host 0 stops them (or goes
    away, or this process gets SIGTERM)."""
    config = {"dtype": args.dtype, "load_format": args.load_format, **engine_options(args)}
    engine_config = check_config(args.data_parallel_size, args.max_queued_requests, config)
    replicas = local_replicas(args.model, args.data_parallel_size, engine_config, config)

    def ready(address: str) -> None:
        print(f"duetjax host {cluster.host_rank} relaying {len(replicas)} replicas to host 0 "
              f"at {address}", flush=True)

    def leave(sig: int, frame: FrameType | None) -> None:
        raise SystemExit(0)  # (the replicas stop on the way out)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, leave)
    try:
        join(cluster)
        return serve_host(cluster, replicas, None, on_ready=ready)
    except (ValueError, TypeError, OSError, ReplicaStartError) as error:
        print(start_error(error), file=sys.stderr)
        return 2


def stop(engine: ServingEngine) -> None:
    """Stops ``engine`` and what it started: replica processes, or duet workers and an MPS
    daemon (idempotent)."""
    engine.close()
    if isinstance(engine, AsyncEngine):
        engine.engine.close()


def served_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return args.served_model_name
    if args.model is None:
        return DEFAULT_MODEL_NAME
    path = Path(args.model).expanduser()
    return path.stem if path.suffix == ".gguf" else (path.resolve().name or str(args.model))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cluster = cluster_of(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if cluster is not None and cluster.host_rank > 0:
        return serve_replicas(args, cluster)
    try:
        engine = start_engine(args, cluster)
    except (ValueError, TypeError, OSError, ReplicaStartError) as error:
        print(start_error(error), file=sys.stderr)
        return 2
    name = served_name(args)
    app = create_app(engine, name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                     drain_timeout=1.0,  # uvicorn drains HTTP for --drain-timeout before that
                     tool_call_parser=args.tool_call_parser,
                     exclude_tools_when_tool_choice_none=args.exclude_tools_when_tool_choice_none,
                     reasoning_parser=args.reasoning_parser)
    freeze_startup_heap()  # (a full collection over the start-up heap would stall every stream)
    gc_pauses()
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=not args.no_access_log,
                            timeout_graceful_shutdown=int(args.drain_timeout))
    try:
        sock = config.bind_socket()
    except SystemExit:
        print(f"error: cannot listen on {args.host}:{args.port}", file=sys.stderr)
        stop(engine)
        return 2
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    server = _Server(config, engine, f"duetjax serving {name} on http://{url_host}:{port}")
    # uvicorn handles the signals while it serves and puts these back when it stops; from then
    # on the process is on its way out, and a late Ctrl-C would only break the event loop's
    # teardown into tracebacks.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    try:
        server.run(sockets=[sock])
    finally:
        stop(engine)
    return FORCED_EXIT_STATUS if server.force_exit else 0


class _Server(uvicorn.Server):
    """uvicorn's server, plus: print the address once listening, refuse new requests as soon
    as a shutdown signal arrives, exit 0 after a graceful drain (uvicorn re-raises the
    signal after shutting down, which would end the process with 143), and stop the engine
    when a second Ctrl-C skips the drain (uvicorn's force exit)."""

    def __init__(self, config: Any, engine: ServingEngine, ready_message: str):
        super().__init__(config)
        self._engine = engine
        self._ready_message = ready_message

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            print(self._ready_message, flush=True)

    async def shutdown(self, sockets: Any = None) -> None:
        await super().shutdown(sockets=sockets)
        if self.force_exit:  # uvicorn skipped the app's shutdown (which stops the engine)
            await self._engine.shutdown(drain_timeout=0.0)  # aborts what is in flight
            await self.lifespan.shutdown()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._engine.begin_drain()
        super().handle_exit(sig, frame)
        if sig in (signal.SIGTERM, signal.SIGINT):
            self._captured_signals.clear()


if __name__ == "__main__":
    sys.exit(main())
