"""Decode speed of `lmforge serve` at 1 and 8 concurrent streams, beside Hugging Face `transformers`.

The same model runs both ways in one invocation: `lmforge serve` in its own process, driven over
HTTP by streaming clients (one thread per stream, each sending `--requests` requests one after
another), and the `lmforge export` of the same checkpoint loaded with transformers'
AutoModelForCausalLM and decoded with `generate` (a batch of 8 for 8 streams). Same prompts (token
ids), same lengths, greedy; `--threads N` puts both on N CPU threads, else each takes its default
(transformers PyTorch's, one per core; `lmforge serve` one per core but one). This machine's speed
drifts by tens of percent within minutes, so the two alternate: each of `--rounds` rounds runs
every phase of both once. `lmforge serve` runs twice, side by side: eager and with `--compile` (its
decode steps through torch.compile, a graph per bucket of rows; `--variants` picks), each started
with an empty compile cache, so that its start-up time, printed, is a first start's (`--compile-cache
shared`: torch's own cache, where graphs compiled before are found again). Reported: the
median over rounds of tokens/s (all streams together), the time to first token (median and 90th
percentile over every request of every round), then lmforge / transformers at one stream and at 8,
and lmforge's 8-stream / 1-stream ratio, each the median of the rounds' own ratios, with their
range; the CPU and its load; and, on Linux, the CPU time per token of each side (lmforge serve's two
processes, the benchmark's client threads, transformers), which other jobs on the machine move less
than they move tokens/s.

Without --run, the model is the demo's architecture (the shakespeare-char recipe: Llama-style,
4 layers, d_model 128, 128-token context) with random weights and a char vocabulary without
<|endoftext|>, so that every request runs its full length; speed does not depend on the weights.

    .venv/bin/python benchmarks/serve.py                       # the demo's size, eager and compiled
    .venv/bin/python benchmarks/serve.py --threads 1           # both on one thread
    .venv/bin/python benchmarks/serve.py --threads 1 --engine-only   # the engine alone, no HTTP
    .venv/bin/python benchmarks/serve.py --run out/runs/shakespeare-char --prompt-tokens 32
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch

from lmforge.inference import load
from lmforge.serve.worker import default_threads

REPO = Path(__file__).resolve().parents[1]
ALPHABET = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # TinyShakespeare's 65


def machine() -> dict:
    """The CPU (model, AVX-512 or not), its cores and the load other jobs put on it."""
    model, flags = "unknown", set()
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    return {
        "cpu": model,
        "avx512": "avx512f" in flags,
        "avx2": "avx2" in flags,
        "cores": os.cpu_count(),
        "load_1min": os.getloadavg()[0],
        "torch": torch.__version__,
    }


def cpu_seconds(pid: int, *, children: bool = True) -> float | None:
    """User + system CPU seconds of process `pid`, all threads, and of its children's (Linux's /proc;
    None elsewhere). Tokens/s on a shared machine move with the other jobs; CPU per token moves less."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        kids = [
            int(kid)
            for task in (Path(f"/proc/{pid}/task").iterdir() if children else ())
            for kid in (task / "children").read_text().split()
        ]
    except OSError:
        return None
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return own + sum(cpu_seconds(kid) or 0.0 for kid in kids)


def with_cpu(run_phase: Callable[..., dict], roles: dict[str, tuple[int, bool]]) -> Callable[..., dict]:
    """`run_phase` that also reports the CPU microseconds per token of each role: `roles` maps a name
    ("server", "clients", ...) to a pid and whether its children count."""

    def measured(*args: object) -> dict:
        before = {role: cpu_seconds(pid, children=kids) for role, (pid, kids) in roles.items()}
        result = run_phase(*args)
        after = {role: cpu_seconds(pid, children=kids) for role, (pid, kids) in roles.items()}
        result["cpu_us_per_token"] = {
            role: 1e6 * (after[role] - before[role]) / result["tokens"]
            for role in roles
            if before[role] is not None and after[role] is not None
        }
        return result

    return measured


def make_run(folder: Path, n_layer: int, d_model: int, n_head: int, block_size: int) -> Path:
    """A checkpoint of the demo's architecture with random weights."""
    from lmforge import checkpoint as ckpt
    from lmforge.config import Config, ModelConfig
    from lmforge.data.tokenizer import char_tokenizer
    from lmforge.model import GPT

    tokenizer = char_tokenizer(ALPHABET)
    tokenizer.save(str(folder / "tokenizer.json"))
    m = ModelConfig(
        n_layer=n_layer,
        n_head=n_head,
        d_model=d_model,
        block_size=block_size,
        position="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
        vocab_size=tokenizer.get_vocab_size(),
    )
    torch.manual_seed(0)
    ckpt.save_checkpoint(
        folder / "run",
        1,
        GPT(m),
        state={},
        config=Config(model=m),
        tokenizer_file=folder / "tokenizer.json",
        val_loss=None,
    )
    return folder / "run"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `lmforge serve`'s flags for each; "tuned" (inductor's GEMMs timed at start) only when asked for
VARIANTS = {"eager": [], "compiled": ["--compile"], "tuned": ["--compile", "--max-autotune"]}


def start_server(
    run: Path,
    checkpoint: str,
    port: int,
    *,
    threads: int | None,
    flags: list[str],
    device: str,
    dtype: str,
    compile_cache: Path | None,
) -> subprocess.Popen:
    """`lmforge serve` on `port`, once it answers; torch.compile's on-disk cache in `compile_cache` (a
    fresh folder: the start-up is a first start's, every graph compiled), or torch's own with None."""
    command = [sys.executable, "-m", "lmforge", "serve", str(run), "--checkpoint", checkpoint, *flags]
    command += ["--threads", str(threads)] if threads else []
    command += ["--device", device, "--dtype", dtype]
    env = {**os.environ, **({"TORCHINDUCTOR_CACHE_DIR": str(compile_cache)} if compile_cache else {})}
    server = subprocess.Popen([*command, "--port", str(port), "--model-name", "bench"], env=env)
    deadline = time.monotonic() + 600  # --compile compiles before it answers: minutes on a busy machine
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).raise_for_status()
            return server
        except httpx.HTTPError:
            if server.poll() is not None:
                raise SystemExit("lmforge serve exited before it answered") from None
            time.sleep(0.2)
    server.kill()
    raise SystemExit("lmforge serve did not answer within 600 s")


def stream_once(http: httpx.Client, url: str, prompt: list[int], new_tokens: int) -> tuple[float, int, str]:
    """One streamed greedy completion: (time to first token in s, tokens, text)."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    started, first, tokens, text = time.perf_counter(), None, 0, ""
    with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"]:
                first = time.perf_counter() - started
            if chunk["choices"]:
                text += chunk["choices"][0]["text"]
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first, tokens, text


def lmforge_phase(url: str, prompts: list[list[int]], streams: int, requests: int, new_tokens: int) -> dict:
    """`streams` clients at once, each sending `requests` requests in turn. Plain HTTP to this
    machine: the clients load no certificates (httpx's default loads the CA bundle, 16-35 ms of CPU
    a client on a 2-core EPYC, which 8 clients paid inside the timed phase, on the cores the server
    shares; unverified, 1 ms), and they are made before the clock starts."""
    results: list[tuple[float, int, str]] = []
    lock = threading.Lock()

    def client(k: int, http: httpx.Client) -> None:
        for r in range(requests):
            result = stream_once(http, url, prompts[(k + r) % len(prompts)], new_tokens)
            with lock:
                results.append(result)

    clients = [httpx.Client(timeout=600, verify=False) for _ in range(streams)]
    threads = [threading.Thread(target=client, args=(k, http)) for k, http in enumerate(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    for http in clients:
        http.close()
    tokens = sum(r[1] for r in results)
    return {
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttfts_ms": [1000 * r[0] for r in results],
        "text": results[0][2] if streams == 1 else None,
    }


def engine_phase(
    engine: object, prompts: list[list[int]], streams: int, requests: int, new_tokens: int
) -> dict:
    """`lmforge serve`'s engine in this process, without HTTP: `streams` chains of `requests` requests,
    each chain's next request submitted as its last one finishes."""
    from lmforge.serve.engine import Job, Params, Update

    params = Params(max_tokens=new_tokens, temperature=0.0, top_p=None, seed=0)
    chains_done = threading.Semaphore(0)
    ttfts, tokens, texts = [], [], {}

    def submit(k: int, r: int) -> None:
        begun, first, text = time.perf_counter(), [], []

        def on_update(update: Update) -> None:  # called from the engine's thread
            if not first:
                first.append(time.perf_counter() - begun)
            text.append(update.text)
            if update.finish_reason is None:
                return
            ttfts.append(first[0])
            tokens.append(update.completion_tokens)
            texts[k, r] = "".join(text)
            if r + 1 < requests:
                submit(k, r + 1)
            else:
                chains_done.release()

        engine.submit([Job(prompts[(k + r) % len(prompts)], params, on_update)])

    started = time.perf_counter()
    for k in range(streams):
        submit(k, 0)
    for _ in range(streams):
        chains_done.acquire()
    wall = time.perf_counter() - started
    return {
        "tokens": sum(tokens),
        "tokens_per_s": sum(tokens) / wall,
        "ttfts_ms": [1000 * t for t in ttfts],
        "text": texts[0, 0] if streams == 1 else None,
    }


class FirstToken:
    """A transformers streamer that notes when the first new tokens arrive (its first put is the prompt)."""

    def __init__(self) -> None:
        self.puts, self.at = 0, None

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def transformers_phase(
    model: object, prompts: list[list[int]], streams: int, requests: int, new_tokens: int
) -> dict:
    """`requests` greedy `generate` calls on a batch of `streams` prompts."""
    ttfts, tokens, first_ids = [], 0, None
    started = time.perf_counter()
    for r in range(requests):
        batch = torch.tensor([prompts[(k + r) % len(prompts)] for k in range(streams)], device=model.device)
        streamer = FirstToken() if streams == 1 else None  # transformers streams only batches of 1
        begun = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                batch,
                attention_mask=torch.ones_like(batch),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                streamer=streamer,
                pad_token_id=0,
            )
        if streamer is not None:
            ttfts.append(streamer.at - begun)
        tokens += (out.size(1) - batch.size(1)) * streams
        first_ids = first_ids if first_ids is not None else out[0, batch.size(1) :].tolist()
    wall = time.perf_counter() - started
    return {
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttfts_ms": [1000 * t for t in ttfts],
        "ids": first_ids,
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--run", help="a run or checkpoint folder (default: the demo's architecture, random weights)"
    )
    p.add_argument("--checkpoint", default="last")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=96, help="tokens generated per request")
    p.add_argument("--requests", type=int, default=4, help="requests per stream and round")
    p.add_argument("--rounds", type=int, default=5, help="times each phase runs, alternating")
    p.add_argument("--threads", type=int, help="CPU threads of both (default: each its own default)")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    p.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=["eager", "compiled"],
        help="lmforge serve's runs",
    )
    p.add_argument(
        "--engine-only",
        action="store_true",
        help="run lmforge serve's engine in this process, without HTTP (its decoding alone)",
    )
    p.add_argument(
        "--compile-cache",
        choices=["empty", "shared"],
        default="empty",
        help="torch.compile's on-disk cache of each server: an empty folder (default: the start-up is a "
        "first start's) or torch's own (TORCHINDUCTOR_CACHE_DIR or its default), where graphs compiled "
        "before are found again (the tests' choice: the start-up they print is not a first start's)",
    )
    p.add_argument("--json", help="also write the results as JSON to this file")
    p.add_argument("--device", default="cpu", help="where both run: cpu (default) or cuda")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="both models' weights")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="lmforge-serve-bench-") as scratch:  # model, export, caches
        measure_and_report(args, Path(scratch))


def measure_and_report(args: argparse.Namespace, scratch: Path) -> None:
    """Both sides at every stream count, then the report; `scratch` holds what the run makes."""
    from lmforge.interop.hf import export_checkpoint

    run = (
        Path(args.run)
        if args.run
        else make_run(scratch, args.n_layer, args.d_model, args.n_head, args.block_size)
    )
    export_checkpoint(run, scratch / "hf", args.checkpoint)
    vocab = load(run, args.checkpoint, "cpu", dtype="fp32").tokenizer.get_vocab_size()
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(vocab, (args.prompt_tokens,), generator=generator).tolist() for _ in range(8)]
    info = machine()
    print(
        f"CPU {info['cpu']} ({info['cores']} cores, AVX-512: {info['avx512']}), load {info['load_1min']:.2f}"
    )
    print(
        f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, greedy, "
        f"{args.requests} requests per stream"
    )
    if args.engine_only:
        ours, theirs, startup = measure_engines(args, run, scratch=scratch, prompts=prompts)
    else:
        ours, theirs, startup = measure_servers(args, run, scratch=scratch, prompts=prompts)
    report(args, info, ours, theirs, run, startup=startup)


def measure_servers(
    args: argparse.Namespace, run: Path, *, scratch: Path, prompts: list[list[int]]
) -> tuple[dict, dict, dict[str, float]]:
    """Each variant as `lmforge serve`, driven over HTTP; its start-up time in seconds."""
    servers, startup = {}, {}
    try:
        for variant in args.variants:  # started one at a time: a compile gets the CPU to itself
            port = free_port()
            started = time.perf_counter()
            server = start_server(
                run,
                args.checkpoint,
                port,
                threads=args.threads,
                # as many rows as the most streams, as the engine-only runs: no graph goes unused
                flags=[*VARIANTS[variant], "--max-batch", str(max(args.streams))],
                device=args.device,
                dtype=args.dtype,
                compile_cache=scratch / f"inductor-{variant}" if args.compile_cache == "empty" else None,
            )
            servers[variant] = (server, port)
            startup[variant] = time.perf_counter() - started
            print(f"lmforge serve ({variant}) answered {startup[variant]:.1f} s after its start", flush=True)
        runners = {
            variant: with_cpu(
                functools.partial(lmforge_phase, f"http://127.0.0.1:{port}"), server_roles(server.pid)
            )
            for variant, (server, port) in servers.items()
        }
        return (*measure(args, runners, scratch=scratch, prompts=prompts), startup)
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait()


def server_roles(pid: int) -> dict[str, tuple[int, bool]]:
    """What `with_cpu` reports of `lmforge serve` at `pid`: the server (its HTTP process and the
    engine's), the HTTP process alone, and the clients (this process's threads)."""
    return {"server": (pid, True), "of which HTTP": (pid, False), "clients": (os.getpid(), False)}


def measure_engines(
    args: argparse.Namespace, run: Path, *, scratch: Path, prompts: list[list[int]]
) -> tuple[dict, dict, dict[str, float]]:
    """Each variant as `lmforge serve`'s engine in this process (no HTTP); its start-up time in
    seconds (torch.compile's on-disk cache as it is: a first start only if it holds nothing)."""
    from lmforge.serve.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    sampler = load(run, args.checkpoint, args.device, dtype=args.dtype)
    engines, startup = {}, {}
    try:
        for variant in args.variants:
            started = time.perf_counter()
            engines[variant] = Engine(
                sampler, max(args.streams), compile=variant != "eager", max_autotune=variant == "tuned"
            ).start()
            startup[variant] = time.perf_counter() - started
            print(f"engine ({variant}) ready {startup[variant]:.1f} s after its start", flush=True)
        runners = {
            variant: with_cpu(functools.partial(engine_phase, engine), {"engine": (os.getpid(), False)})
            for variant, engine in engines.items()
        }
        return (*measure(args, runners, scratch=scratch, prompts=prompts), startup)
    finally:
        for engine in engines.values():
            engine.close()


def measure(
    args: argparse.Namespace,
    runners: dict[str, Callable[..., dict]],
    *,
    scratch: Path,
    prompts: list[list[int]],
) -> tuple[dict, dict]:
    """Every round runs each variant of lmforge serve (`runners[variant](prompts, streams, requests,
    new_tokens)`), then transformers, at each stream count."""
    from transformers import AutoModelForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(scratch / "hf", dtype=dtype).to(args.device).eval()
    ours: dict[str, dict[int, list[dict]]] = {v: {s: [] for s in args.streams} for v in runners}
    theirs: dict[int, list[dict]] = {s: [] for s in args.streams}
    for run_phase in runners.values():  # warm-up
        run_phase(prompts, 1, 1, 4)
    transformers_phase(model, prompts, 1, 1, 4)
    for _ in range(args.rounds):
        for s in args.streams:
            for variant, run_phase in runners.items():
                ours[variant][s].append(run_phase(prompts, s, args.requests, args.new_tokens))
            theirs[s].append(
                with_cpu(transformers_phase, {"transformers": (os.getpid(), False)})(
                    model, prompts, s, args.requests, args.new_tokens
                )
            )
    return ours, theirs


def median_of(results: list[dict], key: str) -> float | None:
    values = [r[key] for r in results if r[key] is not None]
    return statistics.median(values) if values else None


def ttft(results: list[dict]) -> str:
    """Median / 90th percentile of the time to first token over every request of every round."""
    values = sorted(t for r in results for t in r["ttfts_ms"])
    if not values:
        return "-"
    p90 = values[min(len(values) - 1, round(0.9 * (len(values) - 1)))]
    return f"{statistics.median(values):.1f} / {p90:.1f}"


def cpu(results: list[dict]) -> str:
    """Each role's CPU microseconds per token, the median over rounds (the clock's tick is 10 ms)."""
    roles = results[0]["cpu_us_per_token"]
    medians = {role: statistics.median(r["cpu_us_per_token"][role] for r in results) for role in roles}
    return ", ".join(f"{role} {value:.0f}" for role, value in medians.items()) or "-"


def ratios(top: list[dict], bottom: list[dict]) -> list[float]:
    """Each round's tokens/s of `top` over that of `bottom`."""
    return [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(top, bottom)]


def spread(name: str, values: list[float]) -> str:
    return f"{name}: {statistics.median(values):.2f}x (rounds {min(values):.2f}-{max(values):.2f})"


def report(
    args: argparse.Namespace, info: dict, ours: dict, theirs: dict, run: Path, *, startup: dict[str, float]
) -> None:
    threads = args.threads or torch.get_num_threads()
    served = args.threads or default_threads()  # `lmforge serve`'s
    print(f"{args.rounds} rounds, CPU threads: lmforge serve {served}, transformers {threads}")
    if args.engine_only:
        print("lmforge serve: its engine in this process, no HTTP")
    print(
        f"{'':24}{'streams':>8}{'tokens':>8}{'tokens/s':>11}   {'TTFT ms median / p90':<24}CPU us per token"
    )
    rows = [(f"lmforge serve ({v})", results) for v, results in ours.items()]
    for name, results in (*rows, ("transformers", theirs)):
        for s, rounds in results.items():
            speed = median_of(rounds, "tokens_per_s")
            print(f"{name:24}{s:>8}{rounds[0]['tokens']:>8}{speed:>11.1f}   {ttft(rounds):<24}{cpu(rounds)}")
    one, many = min(args.streams), max(args.streams)
    record = {"machine": info, "threads": {"lmforge": served, "transformers": threads}, "startup_s": startup}
    cache = "" if args.compile_cache == "empty" else " (torch.compile's shared cache: not a first start)"
    print("start-up: " + ", ".join(f"{v} {t:.1f} s" for v, t in startup.items()) + cache)
    record["compile_cache"] = args.compile_cache
    tokenizer = load(run, args.checkpoint, "cpu", dtype="fp32").tokenizer
    expected = tokenizer.decode(theirs[one][0]["ids"])
    for variant, results in ours.items():
        single, batched = ratios(results[one], theirs[one]), ratios(results[many], theirs[many])
        scaling = ratios(results[many], results[one])
        print(spread(f"{variant} / transformers at {one} stream", single))
        print(spread(f"{variant} / transformers at {many} streams", batched))
        print(spread(f"{variant} {many} streams / {one}", scaling))
        same = results[one][0]["text"] == expected
        print(f"{variant}: first request's greedy text identical to transformers': {'yes' if same else 'no'}")
        record[variant] = {
            "rounds": {s: [strip(r) for r in rounds] for s, rounds in results.items()},
            "single_stream_ratios": single,
            "many_stream_ratios": batched,
            "scaling": scaling,
            "greedy_identical": same,
        }
    info["load_1min_end"] = os.getloadavg()[0]
    print(f"load at the end {info['load_1min_end']:.2f}")
    if args.json:
        record["transformers"] = {s: [strip(r) for r in rounds] for s, rounds in theirs.items()}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


def strip(result: dict) -> dict:
    """A phase's figures without its text."""
    return {k: v for k, v in result.items() if k not in ("text", "ids")}


if __name__ == "__main__":
    main()
