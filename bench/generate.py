"""New tokens/s of the KV-cached sampler (eager and compiled) against re-forwarding the whole
sequence for every new token.

    python -m bench.generate --model configs/model/120m.yaml --batch-sizes 1 64        # GPU
    python -m bench.generate --model configs/model/tiny.yaml --batch-sizes 1 64        # CPU

Random weights and random prompts of --prompt-len tokens (speed does not depend on what the
model learned); no EOS, so every row generates --new-tokens tokens. Each mode runs once to
warm up (and compile), then --repeats timed runs; the best is reported. Prints a table and
writes JSON (--out).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.models import MODEL_HELP, model_name, model_yaml
from llmkit.io import write_json_atomic
from llmkit.model.config import ModelConfig
from llmkit.model.generation import SamplingConfig, generate, sample_tokens
from llmkit.model.transformer import Transformer
from llmkit.profiling import device_description


@torch.no_grad()
def reforward(model: Transformer, prompts: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """The baseline: a full forward over the whole sequence for every new token (no cache)."""
    generator = torch.Generator(device=prompts.device).manual_seed(config.seed or 0)
    ids = prompts
    for _ in range(config.max_new_tokens):
        token, _ = sample_tokens(model(ids)[:, -1], config, generator)
        ids = torch.cat([ids, token[:, None]], dim=1)
    return ids[:, prompts.size(1) :]


def run(mode: str, model: Transformer, prompts: torch.Tensor, config: SamplingConfig) -> None:
    if mode == "reforward":
        reforward(model, prompts, config)
    else:
        generate(model, prompts.tolist(), replace(config, compile=mode == "compiled"), eos_id=None)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", type=model_name, help=MODEL_HELP)
    p.add_argument("--n-streams", type=int, default=4)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument(
        "--modes", nargs="+", default=["cached", "compiled", "reforward"], choices=["cached", "compiled", "reforward"]
    )
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="lightning_logs/bench/generate.json")
    args = p.parse_args()
    if min(args.batch_sizes) < 1 or args.prompt_len < 1 or args.new_tokens < 1 or args.repeats < 1:
        p.error("--batch-sizes, --prompt-len, --new-tokens and --repeats must be >= 1")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = replace(ModelConfig.from_yaml(model_yaml(args.model)), n_streams=args.n_streams)
    torch.manual_seed(0)
    model = Transformer(config).to(device).eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0, top_k=50, seed=0)
    name = device_description()
    print(
        f"{args.model} n_streams={args.n_streams} ({model.num_params() / 1e6:.1f}M params), prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}, {name}"
    )
    print(f"{'batch':>5} {'mode':>10} {'seconds':>9} {'new tok/s':>10} {'vs reforward':>13}")
    rows = []
    for batch in args.batch_sizes:
        prompts = torch.randint(0, config.vocab_size, (batch, args.prompt_len), device=device)
        results = {}
        for mode in args.modes:
            with autocast:
                run(mode, model, prompts, sampling)  # warm-up / compile
                times = []
                for _ in range(args.repeats):
                    sync()
                    start = time.perf_counter()
                    run(mode, model, prompts, sampling)
                    sync()
                    times.append(time.perf_counter() - start)
            results[mode] = min(times)
        for mode, seconds in results.items():
            speedup = f"{results['reforward'] / seconds:.1f}x" if "reforward" in results else "-"
            tps = batch * args.new_tokens / seconds
            rows.append({"batch": batch, "mode": mode, "seconds": seconds, "new_tokens_per_s": tps})
            print(f"{batch:>5} {mode:>10} {seconds:>9.3f} {tps:>10.0f} {speedup:>13}")
    out = Path(args.out)
    write_json_atomic(out, {"args": vars(args), "device": name, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
