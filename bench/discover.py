"""TTT-Discover vs best-of-N at the same sampling budget, on AC1 and Erdős minimum overlap.

    python -m bench.discover                                   # demo model, CPU-sized (about 18 minutes on 2 cores)
    python -m bench.discover --ckpt BASE.ckpt --tokenizer TOK.model --steps 50 --starts 8 --group 64   # one GPU

1. Format warm-up: the base model (default: `llmkit demo`'s, trained on code only) first learns
   the answer format with a short SFT run on the environment's prompts (as the loop builds
   them, with random current and archive states) followed by random valid answer lines
   (``--warmup-steps``). Without it a small model never emits a valid line,
   every reward is 0 and there is nothing to compare.
2. From that checkpoint, per environment and seed, the same budget of ``steps x starts x group``
   rollouts is spent four ways: TTT-Discover (adaptive beta, PUCT reuse), best-of-N (no updates,
   always from the initial state), TTT with a fixed beta, and TTT without reuse.
3. Reports the best reward found (and the bound / C5 it means) per method and seed, and writes
   JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

import lightning as L
import torch

from llmkit.data.sdft_data import SDFTDataModule
from llmkit.discovery.env import load_env
from llmkit.io import write_json_atomic, write_jsonl_atomic
from llmkit.modules.sft import SFTModule
from llmkit.modules.ttt_discover import TTTDiscoverModule
from llmkit.profiling import device_description

ENVS = {
    "ac1": "llmkit.discovery.envs.AutocorrelationEnv",
    "erdos": "llmkit.discovery.envs.ErdosMinOverlapEnv",
}
METHODS = {  # name -> TTTConfig overrides
    "ttt": {},
    "best_of_n": {"mode": "best_of_n"},
    "fixed_beta": {"fixed_beta": None},  # filled from --fixed-beta
    "no_reuse": {"reuse": False},
}


def trainer(args: argparse.Namespace, steps: int, name: str) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="auto", devices=1, precision=args.precision, logger=False,
                     enable_checkpointing=False, enable_progress_bar=args.progress, enable_model_summary=False,
                     default_root_dir=str(Path(args.work) / name))


def warm_up(env_name: str, args: argparse.Namespace) -> Path:
    """SFT on (a prompt as the loop builds it, a random valid answer line): the format, not a
    good answer. Prompts show a random current state and 0 to 2 other archive entries, since
    the loop's prompts change as the archive fills."""
    env = load_env(ENVS[env_name], {"n": args.n, "q": args.q})
    rng = random.Random(args.seed)

    def valid_line() -> str:
        while True:
            line = " ".join(str(rng.randint(0, args.q)) for _ in range(args.n))
            try:
                env.reward(line)
                return line
            except ValueError:
                continue  # e.g. Erdős levels that rescale above 1

    lines = []
    for _ in range(args.warmup_examples):
        current = valid_line() if rng.random() < 0.8 else env.initial_state()
        others = [valid_line() for _ in range(rng.randint(0, 2))]
        lines.append({"prompt": env.context_from_archive(current, [current, *others]), "demonstration": valid_line()})
    data = Path(args.work) / f"{env_name}_format.jsonl"
    write_jsonl_atomic(data, lines)
    L.seed_everything(args.seed, verbose=False)
    module = SFTModule(init_ckpt=args.ckpt, tokenizer=args.tokenizer, optim={"lr": args.warmup_lr, "warmup_steps": 5})
    run = trainer(args, args.warmup_steps, f"{env_name}_warmup")
    run.fit(module, SDFTDataModule(str(data), batch_size=8, seed=args.seed))
    ckpt = Path(args.work) / f"{env_name}_warm.ckpt"
    run.save_checkpoint(ckpt, weights_only=True)
    return ckpt


def discover(env_name: str, method: str, seed: int, base: Path, args: argparse.Namespace) -> dict:
    overrides = dict(METHODS[method])
    if method == "fixed_beta":
        overrides["fixed_beta"] = args.fixed_beta
    ttt = {"env": ENVS[env_name], "env_args": {"n": args.n, "q": args.q}, "starts_per_step": args.starts,
           "group_size": args.group, "max_new_tokens": args.max_new_tokens, "adapter_every": args.steps, **overrides}
    out = Path(args.work) / f"{env_name}_{method}_seed{seed}"
    L.seed_everything(seed, verbose=False)
    module = TTTDiscoverModule(ttt=ttt, lora={"rank": args.rank, "alpha": 2.0 * args.rank}, out_dir=str(out),
                               init_ckpt=str(base), tokenizer=args.tokenizer, optim={"lr": args.lr, "warmup_steps": 0})
    trainer(args, args.steps, out.name).fit(module)
    result = json.loads((out / "result.json").read_text())
    log = [json.loads(line) for line in (out / "discovery_log.jsonl").read_text().splitlines()]
    failures = sum(r["failures"] for r in log) / max(1, result["rollouts"])
    return {"env": env_name, "method": method, "seed": seed, "best_reward": result["best_reward"],
            "initial_reward": result["initial_reward"], "rollouts": result["rollouts"], "invalid_fraction": failures}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="lightning_logs/demo/checkpoints/last.ckpt")
    p.add_argument("--tokenizer", default="lightning_logs/demo/tokenizer/spm.model")
    p.add_argument("--envs", nargs="+", default=list(ENVS), choices=list(ENVS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--starts", type=int, default=2, help="start states per step")
    p.add_argument("--group", type=int, default=4, help="rollouts per start state")
    p.add_argument("--n", type=int, default=16, help="sequence length")
    p.add_argument("--q", type=int, default=20, help="largest value")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--lr", type=float, default=4e-5, help="the paper's")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank (the paper's)")
    p.add_argument("--fixed-beta", type=float, default=10.0)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--warmup-examples", type=int, default=500)
    p.add_argument("--warmup-lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="seed of the format warm-up")
    p.add_argument("--precision", default="bf16-mixed" if torch.cuda.is_available() else "32-true")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--work", default="lightning_logs/bench/discover")
    p.add_argument("--out", default=None, help="JSON results (default WORK/discover.json)")
    args = p.parse_args(argv)
    for flag, path in (("--ckpt", args.ckpt), ("--tokenizer", args.tokenizer)):
        if not Path(path).is_file():
            p.error(f"{flag} {path} does not exist: run `llmkit demo` first (it writes both), or pass yours")
    if args.group < 3:
        p.error(f"--group must be >= 3 (two rollouts make the adaptive beta unbounded), got {args.group}")

    runs = []
    for env_name in args.envs:
        base = warm_up(env_name, args)
        for seed in args.seeds:
            for method in args.methods:
                runs.append(discover(env_name, method, seed, base, args))
                r = runs[-1]
                print(f"  {env_name} {method} seed {seed}: best reward {r['best_reward']:.6f} "
                      f"(initial {r['initial_reward']:.6f}, {r['invalid_fraction']:.0%} invalid rollouts)")
    device = device_description()
    budget = args.steps * args.starts * args.group
    print(f"\n{args.ckpt}, {device}; n {args.n}, q {args.q}; {budget} rollouts per run ({args.steps} steps x "
          f"{args.starts} starts x {args.group}); seeds {args.seeds}")
    print(f"{'env':<6} {'method':<11} {'best reward per seed':>28} {'mean':>9} {'= bound / C5':>13} {'invalid':>8}")
    for env_name in args.envs:
        for method in args.methods:
            rs = [r for r in runs if r["env"] == env_name and r["method"] == method]
            best = [r["best_reward"] for r in rs]
            mean = statistics.fmean(best)
            invalid = statistics.fmean(r["invalid_fraction"] for r in rs)
            print(f"{env_name:<6} {method:<11} {' '.join(f'{b:.5f}' for b in best):>28} {mean:>9.5f} "
                  f"{1 / mean:>13.5f} {invalid:>8.0%}")
    out = Path(args.out or Path(args.work) / "discover.json")
    write_json_atomic(out, {"args": vars(args), "device": device, "runs": runs})
    print(f"wrote {out}")
    return runs


if __name__ == "__main__":
    main()
