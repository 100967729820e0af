"""Serving benchmark for any OpenAI-compatible endpoint (duetjax, vLLM, SGLang, ...).

    python tools/bench_serve.py --base-url http://127.0.0.1:8000 --dataset random \\
        --random-input-len 1024 --random-output-len 128 --num-prompts 200 --request-rate 4
    python tools/bench_serve.py --dataset azure-conversation --request-rate 1,2,4,8 --result-dir out/
    python tools/bench_serve.py --dataset sharegpt --dataset-path ShareGPT_V3.json \\
        --endpoint /v1/chat/completions --max-concurrency 16 --goodput ttft:500 tpot:50

Metrics follow ``vllm bench serve`` in name and meaning: request and output-token throughput;
TTFT (time to first token), TPOT (time per output token after the first, per request), ITL
(time between consecutive streamed chunks), E2E latency; mean, median, std and p99 in ms;
goodput = requests per second that meet every ``--goodput`` SLO. Results go to JSON (vLLM's
keys) and, with matplotlib, to plots: TTFT and ITL CDFs and latency against request rate.

Prompts: on /v1/completions synthetic prompts are random token ids of exactly the sampled
length (no tokenizer needed; ids are drawn from [100, --vocab-size)). On the chat endpoint they
are text: exact lengths with ``--tokenizer DIR`` (a directory holding tokenizer.json), else
random words, about one token each. Output lengths are enforced with max_tokens and vLLM's
``ignore_eos`` extra (``--no-ignore-eos`` for servers that reject it).

Synthetic length distributions (lognormal; the centres are published figures, the spreads our
assumption, so treat these as shapes, not replays):
  azure-code          input median 1500, output median 13    Splitwise (ISCA 2024), Azure 2023 coding trace
  azure-conversation  input median 1020, output median 129   Splitwise, Azure 2023 conversation trace
  mooncake            input mean 7590, output mean 182       Mooncake (FAST 2025), Kimi trace
``--dataset mooncake --dataset-path trace.jsonl`` replays a real Mooncake-format trace instead:
its timestamps set the arrivals and its ``hash_ids`` (512-token blocks) the shared prefixes.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

SYNTHETIC = {
    # name: (input centre, input sigma, output centre, output sigma, centre is "median"|"mean")
    "azure-code": (1500, 0.9, 13, 1.0, "median"),
    "azure-conversation": (1020, 0.9, 129, 0.8, "median"),
    "mooncake": (7590, 0.7, 182, 0.8, "mean"),
}
MOONCAKE_BLOCK = 512
"""Tokens per hash id in Mooncake traces."""
WORDS = ("the of and to in is was for on that with as by at from his her an were are which this "
         "be or has had not but they first one their its new after who also been more two time "
         "into other can some all over when there than many most these through may only years "
         "city world made state during about where however between known called people since").split()


@dataclasses.dataclass
class SampleRequest:
    prompt: str | list[int]
    prompt_len: int
    output_len: int
    arrival: float | None = None
    """Seconds after the start (trace replay); None: drawn from the arrival process."""


@dataclasses.dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)
    text: str = ""
    error: str = ""


# ---- datasets -------------------------------------------------------------------------------

class PromptMaker:
    """Prompts of a given token length: token ids, exact text (with a tokenizer), or words."""

    def __init__(self, rng: np.random.Generator, vocab_size: int, as_text: bool,
                 tokenizer_dir: str | None):
        self.rng = rng
        self.vocab_size = vocab_size
        self.as_text = as_text
        self.tokenizer = None
        if tokenizer_dir:
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))

    def ids(self, n: int, rng: np.random.Generator | None = None) -> list[int]:
        low = min(100, self.vocab_size // 2)
        return (rng or self.rng).integers(low, self.vocab_size, size=n).tolist()

    def make(self, ids: list[int]) -> str | list[int]:
        if not self.as_text:
            return ids
        if self.tokenizer is not None:  # decode, re-encode, trim to the exact length
            text = self.tokenizer.decode(ids)
            encoded = self.tokenizer.encode(text, add_special_tokens=False).ids[:len(ids)]
            return self.tokenizer.decode(encoded)
        return " ".join(WORDS[i % len(WORDS)] for i in ids)

    def count(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text, add_special_tokens=False).ids)
        return max(1, round(len(text) / 4))  # the usual rule of thumb for English


def _lognormal(rng: np.random.Generator, centre: float, sigma: float, kind: str, n: int,
               cap: int) -> np.ndarray:
    mu = math.log(centre) - (sigma**2 / 2 if kind == "mean" else 0.0)
    return np.clip(np.round(rng.lognormal(mu, sigma, size=n)), 1, cap).astype(int)


def load_dataset(args: argparse.Namespace, maker: PromptMaker) -> list[SampleRequest]:
    rng = np.random.default_rng(args.seed)
    n = args.num_prompts
    if args.dataset == "random":
        r = args.random_range_ratio
        ins = rng.integers(max(1, int(args.random_input_len * (1 - r))),
                           int(args.random_input_len * (1 + r)) + 1, size=n)
        outs = rng.integers(max(1, int(args.random_output_len * (1 - r))),
                            int(args.random_output_len * (1 + r)) + 1, size=n)
        return [SampleRequest(maker.make(maker.ids(int(i))), int(i), int(o)) for i, o in zip(ins, outs)]
    if args.dataset == "sharegpt":
        return _sharegpt(args, maker, rng)
    if args.dataset == "mooncake" and args.dataset_path:
        return _mooncake_trace(args, maker)
    centre_in, sigma_in, centre_out, sigma_out, kind = SYNTHETIC[args.dataset]
    ins = _lognormal(rng, centre_in, sigma_in, kind, n, args.max_input_len)
    outs = _lognormal(rng, centre_out, sigma_out, kind, n, args.max_output_len)
    return [SampleRequest(maker.make(maker.ids(int(i))), int(i), int(o)) for i, o in zip(ins, outs)]


def _sharegpt(args: argparse.Namespace, maker: PromptMaker,
              rng: np.random.Generator) -> list[SampleRequest]:
    """The first human turn of each conversation; the reply's length sets max_tokens."""
    if not args.dataset_path:
        raise SystemExit("error: --dataset sharegpt needs --dataset-path FILE (ShareGPT JSON)")
    data = json.loads(Path(args.dataset_path).read_text())
    pairs = [(c["conversations"][0]["value"], c["conversations"][1]["value"])
             for c in data if len(c.get("conversations", [])) >= 2]
    order = rng.permutation(len(pairs))
    samples = []
    for index in order:
        prompt, reply = pairs[index]
        prompt_len, output_len = maker.count(prompt), maker.count(reply)
        if prompt_len < 4 or output_len < 4 or prompt_len > args.max_input_len:
            continue  # vLLM's filter: drop trivial and overlong conversations
        samples.append(SampleRequest(prompt, prompt_len, min(output_len, args.max_output_len)))
        if len(samples) == args.num_prompts:
            break
    return samples


def _mooncake_trace(args: argparse.Namespace, maker: PromptMaker) -> list[SampleRequest]:
    samples = []
    with open(args.dataset_path) as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            ids: list[int] = []
            for hash_id in row.get("hash_ids", []):  # same hash id, same block: shared prefixes
                ids += maker.ids(MOONCAKE_BLOCK, np.random.default_rng(hash_id))
            length = min(int(row["input_length"]), args.max_input_len)
            ids = (ids + maker.ids(max(0, length - len(ids))))[:length]
            samples.append(SampleRequest(maker.make(ids), length,
                                         min(int(row["output_length"]), args.max_output_len),
                                         arrival=row["timestamp"] / 1000.0))
            if len(samples) == args.num_prompts:
                break
    return samples


# ---- sending --------------------------------------------------------------------------------

def _payload(args: argparse.Namespace, model: str, sample: SampleRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": sample.output_len, "stream": True,
                            "temperature": args.temperature,
                            "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint.endswith("chat/completions"):
        prompt = sample.prompt if isinstance(sample.prompt, str) else " ".join(map(str, sample.prompt))
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = sample.prompt
    return body


async def send(client: httpx.AsyncClient, url: str, body: dict[str, Any],
               sample: SampleRequest) -> RequestResult:
    result = RequestResult(prompt_len=sample.prompt_len)
    start = time.perf_counter()
    last = start
    chunks = 0
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:300]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = str(event["error"])
                    return result
                usage = event.get("usage")
                if usage:
                    result.output_tokens = usage.get("completion_tokens", 0)
                    result.prompt_len = usage.get("prompt_tokens", result.prompt_len)
                for choice in event.get("choices") or []:
                    text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                    if not text:
                        continue
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
                    result.text += text
        result.latency = time.perf_counter() - start
        result.output_tokens = result.output_tokens or chunks
        result.success = chunks > 0 or result.output_tokens > 0
        if not result.success:
            result.error = "no tokens streamed"
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        result.error = f"{type(error).__name__}: {error}"
    return result


async def run_load(args: argparse.Namespace, base_url: str, model: str, rate: float,
                   samples: list[SampleRequest]) -> tuple[list[RequestResult], float]:
    """Sends every sample, at ``rate`` (Poisson for burstiness 1, gamma otherwise) or as a
    trace says, with at most --max-concurrency in flight."""
    rng = np.random.default_rng(args.seed)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.max_concurrency or None, max_keepalive_connections=64)
    semaphore = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    url = base_url.rstrip("/") + args.endpoint

    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(args.timeout),
                                 limits=limits) as client:
        async def one(sample: SampleRequest) -> RequestResult:
            body = _payload(args, model, sample)
            if semaphore is None:
                return await send(client, url, body, sample)
            async with semaphore:
                return await send(client, url, body, sample)

        start = time.perf_counter()
        tasks = []
        delay = 0.0
        for sample in samples:
            if sample.arrival is not None:
                delay = sample.arrival / args.trace_speedup
            elif math.isfinite(rate):
                delay += rng.gamma(args.burstiness, 1.0 / (rate * args.burstiness))
            wait = start + delay - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(one(sample)))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


# ---- metrics --------------------------------------------------------------------------------

def parse_goodput(items: list[str] | None) -> dict[str, float]:
    slos = {}
    for item in items or []:
        name, _, value = item.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not value:
            raise SystemExit(f"error: --goodput takes ttft:MS, tpot:MS or e2el:MS, got {item!r}")
        slos[name] = float(value)
    return slos


def compute_metrics(results: list[RequestResult], duration: float, slos: dict[str, float],
                    percentiles: list[float]) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    ttfts = [r.ttft for r in ok]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itls = [x for r in ok for x in r.itl]
    e2els = [r.latency for r in ok]
    good = 0
    for r in ok:
        tpot = (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
        measured = {"ttft": r.ttft, "tpot": tpot, "e2el": r.latency}
        good += all(measured[k] * 1000 <= v for k, v in slos.items())
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    metrics: dict[str, Any] = {
        "duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "request_goodput": good / duration if slos else None,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
    }
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        ms = np.asarray(values or [0.0]) * 1000
        metrics[f"mean_{name}_ms"] = float(ms.mean())
        metrics[f"median_{name}_ms"] = float(np.median(ms))
        metrics[f"std_{name}_ms"] = float(ms.std())
        for p in percentiles:
            metrics[f"p{p:g}_{name}_ms"] = float(np.percentile(ms, p))
    metrics.update(input_lens=[r.prompt_len for r in results],
                   output_lens=[r.output_tokens for r in results],
                   ttfts=[r.ttft for r in results], itls=[r.itl for r in results],
                   e2els=[r.latency for r in results], generated_texts=[r.text for r in results],
                   errors=[r.error for r in results])
    return metrics


def print_summary(m: dict[str, Any], rate: float, percentiles: list[float]) -> None:
    line = "=" * 50
    print(f"{line}\n{' Serving Benchmark Result (rate ' + str(rate) + ' req/s) ':=^50}")
    rows = [("Successful requests:", m["completed"]), ("Failed requests:", m["failed"]),
            ("Benchmark duration (s):", f"{m['duration']:.2f}"),
            ("Total input tokens:", m["total_input_tokens"]),
            ("Total generated tokens:", m["total_output_tokens"]),
            ("Request throughput (req/s):", f"{m['request_throughput']:.2f}")]
    if m["request_goodput"] is not None:
        rows.append(("Request goodput (req/s):", f"{m['request_goodput']:.2f}"))
    rows += [("Output token throughput (tok/s):", f"{m['output_throughput']:.2f}"),
             ("Total token throughput (tok/s):", f"{m['total_token_throughput']:.2f}")]
    for label, value in rows:
        print(f"{label:<40}{value:<10}")
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        print(f"{title:-^50}")
        print(f"{'Mean ' + name.upper() + ' (ms):':<40}{m[f'mean_{name}_ms']:<10.2f}")
        print(f"{'Median ' + name.upper() + ' (ms):':<40}{m[f'median_{name}_ms']:<10.2f}")
        for p in percentiles:
            print(f"{f'P{p:g} ' + name.upper() + ' (ms):':<40}{m[f'p{p:g}_{name}_ms']:<10.2f}")
    print(line)


def plot(runs: list[dict[str, Any]], out: Path, tail: float) -> list[Path]:
    """TTFT and ITL CDFs (one line per rate) and, for a sweep, latency against request rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, title in (("ttfts", "TTFT"), ("itls", "ITL")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for run in runs:
            values = run[key] if key == "ttfts" else [x for r in run[key] for x in r]
            values = np.sort(np.asarray([v for v, e in zip(values, run["errors"]) if not e]
                                        if key == "ttfts" else values) * 1000)
            if len(values):
                ax.plot(values, np.arange(1, len(values) + 1) / len(values),
                        label=f"{run['request_rate']} req/s")
        ax.set(xlabel=f"{title} (ms)", ylabel="CDF", title=f"{title} CDF")
        ax.grid(alpha=0.3)
        ax.legend()
        path = out / f"{title.lower()}_cdf.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    if len(runs) > 1:
        rates = [r["request_throughput"] for r in runs]
        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        for ax, name in zip(axes, ("ttft", "tpot", "e2el")):
            ax.plot(rates, [r[f"mean_{name}_ms"] for r in runs], "o-", label="mean")
            ax.plot(rates, [r[f"p{tail:g}_{name}_ms"] for r in runs], "s--", label=f"p{tail:g}")
            ax.set(xlabel="achieved request rate (req/s)", ylabel=f"{name.upper()} (ms)",
                   title=f"{name.upper()} vs request rate")
            ax.grid(alpha=0.3)
            ax.legend()
        path = out / "latency_vs_rate.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


# ---- command line ---------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (no /v1)")
    p.add_argument("--endpoint", default="/v1/completions",
                   choices=("/v1/completions", "/v1/chat/completions"))
    p.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--dataset", default="random",
                   choices=("random", "sharegpt", *SYNTHETIC))
    p.add_argument("--dataset-path", default=None, help="ShareGPT JSON, or a Mooncake JSONL trace")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len*(1-r), len*(1+r)]; 0: fixed")
    p.add_argument("--max-input-len", type=int, default=32768, help="cap on sampled input lengths")
    p.add_argument("--max-output-len", type=int, default=4096, help="cap on sampled output lengths")
    p.add_argument("--vocab-size", type=int, default=32000, help="token ids are drawn below this")
    p.add_argument("--tokenizer", default=None, help="directory with tokenizer.json, for exact text prompts")
    p.add_argument("--request-rate", default="inf",
                   help="requests per second ('inf': all at once); a comma list runs a sweep")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of inter-arrival times: 1 is Poisson, <1 burstier")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    p.add_argument("--trace-speedup", type=float, default=1.0, help="replay a trace this much faster")
    p.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 (e2el too)")
    p.add_argument("--percentiles", default="99", help="comma list of percentiles to report")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="send vLLM's ignore_eos so outputs reach their sampled length")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-dir", default=None, help="write JSON results (and plots) here")
    p.add_argument("--no-plots", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    slos = parse_goodput(args.goodput)
    percentiles = [float(p) for p in args.percentiles.split(",")]
    rates = [float(r) for r in args.request_rate.split(",")]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model
    if model is None:
        response = httpx.get(args.base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
        response.raise_for_status()
        model = response.json()["data"][0]["id"]
    maker = PromptMaker(np.random.default_rng(args.seed), args.vocab_size,
                        as_text=args.endpoint.endswith("chat/completions"), tokenizer_dir=args.tokenizer)
    samples = load_dataset(args, maker)
    if not samples:
        raise SystemExit("error: the dataset produced no requests")
    runs = []
    for rate in rates:
        results, duration = asyncio.run(run_load(args, args.base_url, model, rate, samples))
        metrics = compute_metrics(results, duration, slos, percentiles)
        metrics.update(date=datetime.now().strftime("%Y%m%d-%H%M%S"), backend="openai",
                       endpoint=args.endpoint, model_id=model, dataset=args.dataset,
                       num_prompts=len(samples), request_rate=rate, burstiness=args.burstiness,
                       max_concurrency=args.max_concurrency, goodput_slos_ms=slos or None)
        print_summary(metrics, rate, percentiles)
        failures = [e for e in metrics["errors"] if e]
        if failures:
            print(f"{len(failures)} requests failed; first error: {failures[0]}", file=sys.stderr)
        runs.append(metrics)
    if args.result_dir:
        out = Path(args.result_dir)
        out.mkdir(parents=True, exist_ok=True)
        for run in runs:
            (out / f"rate_{run['request_rate']}.json").write_text(json.dumps(run, indent=1))
        summary = [{k: v for k, v in run.items() if not isinstance(v, list)} for run in runs]
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        if not args.no_plots:
            for path in plot(runs, out, percentiles[-1]):
                print(f"wrote {path}")
    return 0 if all(run["completed"] for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
