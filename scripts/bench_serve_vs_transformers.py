"""The serving benchmark: `moerun serve` against `transformers serve --continuous-batching`, same machine, same
checkpoint, same requests, measured by `moerun bench serve` (docs/performance.md, "Serving").

    python scripts/bench_serve_vs_transformers.py [--work DIR] [--rounds 2] [--quick]

1. Builds (once, seeded) a transformers-saved MiniMax-M2 checkpoint of about 0.8 GB in DIR/checkpoint:
   MiniMaxM2ForCausalLM.save_pretrained (fp32; 8 layers, hidden 512, 32 experts of 512, top-4, GQA 8/2 heads of
   64 with 32 rotary dims) with the embedded demo's tokenizer and M2 chat template.
2. For each round, for each server in turn (A B A B ...): starts it on a free loopback port, waits for /health,
   runs `moerun bench serve` at each concurrency level (fixed prompt and output lengths, greedy), stops it.
3. Prints one table: per server and level, the median over rounds (and the min-max spread) of output tokens/s and
   TTFT p50/p99, TPOT p50, and the targets' verdicts; writes every run's JSON under DIR/results.

Both servers generate exactly --output-len tokens: moerun through `ignore_eos` + `min_tokens`, transformers serve
(which refuses fields outside OpenAI's schema) through its own `generation_config` request field with
`min_new_tokens`. Both run in fp32 on the CPU with greedy decoding.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
             rotary_dim=32, intermediate_size=512, num_local_experts=32, num_experts_per_tok=4,
             max_position_embeddings=4096)
SEED = 0
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def build_checkpoint(folder: Path) -> Path:
    """MiniMaxM2ForCausalLM with seeded weights N(0, 1/fan_in) (norms near 1, a random routing bias), saved by
    transformers itself, plus the demo's tokenizer and chat template. Skipped when the folder is complete."""
    if (folder / "done").is_file():
        return folder
    import torch
    from transformers import MiniMaxM2Config, MiniMaxM2ForCausalLM

    from moerun.runtime.demo import ensure_demo_checkpoint

    demo = ensure_demo_checkpoint()
    demo_config = json.loads((demo / "config.json").read_text())
    config = MiniMaxM2Config(vocab_size=demo_config["vocab_size"], bos_token_id=demo_config.get("bos_token_id"),
                             eos_token_id=demo_config.get("eos_token_id"), pad_token_id=None, **SHAPE)
    torch.manual_seed(SEED)
    model = MiniMaxM2ForCausalLM(config).float().eval()
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5)
        for layer in model.model.layers:
            layer.mlp.e_score_correction_bias.copy_(0.1 * torch.randn(config.num_local_experts, generator=generator))
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in TOKENIZER_FILES:
        shutil.copy(demo / name, tmp / name)
    # No sampling defaults: both servers decode greedily because every request says so.
    (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": config.eos_token_id}))
    (tmp / "done").write_text("")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


# ---- the two servers ---------------------------------------------------------------------------------------------

BLOCK_SIZE, NUM_BLOCKS, MAX_BATCH_TOKENS = 16, 4096, 2048  # the same KV capacity and step budget for both


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moerun_command(checkpoint: Path, work: Path, port: int) -> list[str]:
    config = work / "moerun.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "backend": "cpu", "model": {"path": str(checkpoint), "dtype": "float32"},
        "kv_cache": {"block_size": BLOCK_SIZE, "num_blocks": NUM_BLOCKS},
        "scheduler": {"max_num_seqs": 64, "max_num_batched_tokens": MAX_BATCH_TOKENS}}))
    return [sys.executable, "-m", "moerun", "serve", "-c", str(config), "--port", str(port),
            "--no-access-log", "--log-level", "warning"]


def transformers_command(checkpoint: Path, work: Path, port: int) -> list[str]:
    # The `transformers` entry point, run by this Python (it needs fastapi and uvicorn, which moerun brings).
    launcher = "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; main()"
    return [sys.executable, "-c", launcher, "serve", "--continuous-batching", "--device", "cpu", "--dtype", "float32",
            "--cb-block-size", str(BLOCK_SIZE), "--cb-num-blocks", str(NUM_BLOCKS),
            "--cb-max-batch-tokens", str(MAX_BATCH_TOKENS), "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning", str(checkpoint)]


def bench_flags(server: str, checkpoint: Path, output_len: int) -> list[str]:
    """Greedy, exactly output_len tokens. transformers serve answers fields outside OpenAI's schema with 422, so
    it gets its own generation_config field; moerun honours ignore_eos + min_tokens (vLLM's way)."""
    if server == "moerun":
        return ["--ignore-eos", "--extra-body", json.dumps({"temperature": 0})]
    generation = {"max_new_tokens": output_len, "min_new_tokens": output_len, "do_sample": False}
    return ["--model", str(checkpoint), "--no-ignore-eos",
            "--extra-body", json.dumps({"temperature": 0, "generation_config": json.dumps(generation)})]


SERVERS = {"moerun": moerun_command, "transformers": transformers_command}


@contextlib.contextmanager
def running(server: str, checkpoint: Path, work: Path, log: Path, threads: int | None):
    port = free_port()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}  # torch's intra-op threads
    with open(log, "w") as log_file:
        process = subprocess.Popen(SERVERS[server](checkpoint, work, port), stdout=log_file, stderr=subprocess.STDOUT,
                                   env=env)
        try:
            wait_healthy(f"http://127.0.0.1:{port}/health", process, log)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}; see {log}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        time.sleep(1)
    raise SystemExit(f"the server did not become healthy in {timeout_s:.0f} s; see {log}")


def run_level(server: str, endpoint: str, checkpoint: Path, level: int, requests: int, args, out: Path) -> dict:
    command = [sys.executable, "-m", "moerun", "bench", "serve", "--endpoint", endpoint,
               "--concurrency", str(level), "--num-requests", str(requests), "--input-len", str(args.input_len),
               "--output-len", str(args.output_len), "--warmup", "1", "--seed", str(SEED), "--out", str(out),
               *bench_flags(server, checkpoint, args.output_len)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    (result,) = json.loads(out.read_text())["levels"]
    return result


# ---- the report --------------------------------------------------------------------------------------------------

def median_and_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def report(results: dict[tuple[str, int], list[dict]], levels: list[int]) -> str:
    from moerun.runtime.table import format_table

    rows = []
    for server in SERVERS:
        for level in levels:
            runs = results[(server, level)]
            rows.append([server, str(level), f"{sum(r['completed'] for r in runs)}/{sum(r['num_requests'] for r in runs)}",
                         median_and_spread([r["output_tokens_per_s"] for r in runs]),
                         median_and_spread([r["ttft_ms"]["p50"] for r in runs]),
                         median_and_spread([r["ttft_ms"]["p99"] for r in runs]),
                         median_and_spread([r["tpot_ms"]["p50"] for r in runs])])
    table = format_table(["server", "concurrency", "ok", "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms"],
                         rows)
    verdicts = []
    for level in levels:
        ours, theirs = results[("moerun", level)], results[("transformers", level)]
        ratio = statistics.median(r["output_tokens_per_s"] for r in ours) / \
            statistics.median(r["output_tokens_per_s"] for r in theirs)
        ttft = (statistics.median(r["ttft_ms"]["p50"] for r in ours),
                statistics.median(r["ttft_ms"]["p50"] for r in theirs))
        throughput_target = ("met" if ratio >= 2 else "MISSED") if level >= 16 else "-"
        verdicts.append([str(level), f"{ratio:.2f}x", throughput_target, f"{ttft[0]:.0f} / {ttft[1]:.0f}",
                         "met" if ttft[0] < ttft[1] else "MISSED"])
    verdict = format_table(["concurrency", "out tok/s moerun / transformers", ">= 2x at 16 and 64",
                            "TTFT p50 ms moerun / transformers", "TTFT lower"], verdicts)
    return f"{table}\n\n{verdict}\n(medians over rounds, min-max in parentheses)"


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "bench_results" / "serve_vs_transformers")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of A B; the table shows medians")
    parser.add_argument("--levels", default="1,16,64")
    parser.add_argument("--requests", default="8,32,64", help="requests per level")
    parser.add_argument("--input-len", type=int, default=128, help="prompt words (about 280 tokens here)")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of both servers (OMP_NUM_THREADS); default: torch's (one per core). On "
                             "a machine other jobs keep busy, 1 avoids OpenMP stalls that slow both servers 10x")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    requests = [int(x) for x in args.requests.split(",")]
    if len(levels) != len(requests):
        raise SystemExit("--levels and --requests need the same number of entries")

    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "results").mkdir(exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    print(f"building the checkpoint in {args.work / 'checkpoint'} (once)", file=sys.stderr)
    checkpoint = build_checkpoint(args.work / "checkpoint")
    results: dict[tuple[str, int], list[dict]] = {(s, n): [] for s in SERVERS for n in levels}
    for round_ in range(1, args.rounds + 1):
        for server in SERVERS:
            print(f"round {round_}: {server}", file=sys.stderr)
            with running(server, checkpoint, args.work, args.work / f"{server}-{round_}.log", args.threads) as endpoint:
                for level, count in zip(levels, requests):
                    out = args.work / "results" / f"{server}-r{round_}-c{level}.json"
                    result = run_level(server, endpoint, checkpoint, level, count, args, out)
                    results[(server, level)].append(result)
                    print(f"  c={level}: {result['output_tokens_per_s']:.1f} tok/s, TTFT p50 "
                          f"{result['ttft_ms']['p50']:.0f} ms", file=sys.stderr)
    import torch
    import transformers

    minutes = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds() / 60
    print(f"moerun serve vs transformers serve --continuous-batching  {started:%Y-%m-%d %H:%M} UTC, {minutes:.0f} min")
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, load average "
          f"{load_before[0]:.1f} before / {os.getloadavg()[0]:.1f} after; torch {torch.__version__}, "
          f"transformers {transformers.__version__}; torch threads per server: {args.threads or 'default'}")
    print(f"workload: {args.input_len} prompt words, {args.output_len} output tokens (greedy, fixed), requests per "
          f"level {args.requests}, {args.rounds} rounds interleaved; checkpoint {checkpoint} "
          f"({sum(f.stat().st_size for f in checkpoint.iterdir()) / 1e9:.2f} GB)")
    print(report(results, levels))


if __name__ == "__main__":
    main()
