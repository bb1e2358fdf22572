"""Does SDFT forget less than SFT? A miniature continual-learning experiment (SDFT paper §5).

    python -m bench.continual                      # tiny model, stdlib corpus, CPU-sized (~30 min on 2 cores)
    python -m bench.continual --model configs/model/120m.yaml --pretrain-steps 3000 --steps 300 \
        --batch-size 32 --precision bf16-mixed     # one GPU

1. Pretrain the model on the default corpus mixed with task-format documents: for tasks A and
   B, the SDFT teacher's context, template(x, c), followed by the demonstration c again, drawn
   with other seeds than the fine-tuning data (for the fact tasks: other tables of names).
   This gives the small model what SDFT presumes of a large one, the in-context ability to
   answer a question given a demonstration; it never sees a question answered without one,
   nor any fact it is later taught. ``--pretrained CKPT`` skips this step.
2. From that checkpoint, learn task A, then task B (each ``--steps`` optimizer steps on
   generated examples), once with SFTModule and once with SDFTModule (EMATeacher), same
   learning rate, batch size and steps; no replay, no gates.
3. After every stage, evaluate exact-match accuracy on each task's held-out probes (greedy,
   regex on the answer) and perplexity on the corpus's held-out shard.

Reports the R matrix (R[i][j]: accuracy on task j after stage i; stage 0 is the pretrained
model, and task j, counted from 0, is learned in stage j + 1), ACC = mean_j R[T][j],
BWT = mean_{j<T-1} (R[T][j] - R[j+1][j]) (GEM, Lopez-Paz & Ranzato 2017), and the held-out
perplexity before and after. Prints tables and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from bench.models import MODEL_HELP, model_name, model_yaml
from llmkit.callbacks import EMATeacher, TokenThroughput
from llmkit.data.corpus import DOC_SEPARATOR
from llmkit.data.datamodule import PackedDataModule
from llmkit.data.examples import teacher_prompt
from llmkit.data.packing import pack
from llmkit.data.pipeline import build_corpus_shards
from llmkit.data.sdft_data import SDFTDataModule
from llmkit.data.tasks import TASKS, make_examples, make_probes
from llmkit.data.tokenizer import Tokenizer
from llmkit.eval import evaluate, read_probes
from llmkit.io import write_json_atomic, write_jsonl_atomic
from llmkit.model.checkpoint import load_backbone
from llmkit.model.config import ModelConfig
from llmkit.modules.pretrain import PretrainModule
from llmkit.modules.sdft import SDFTModule
from llmkit.modules.sft import SFTModule
from llmkit.optim import OptimConfig
from llmkit.profiling import device_description

MIX_EXAMPLES_PER_SEED = 16
"""Task-format documents drawn per seed: each fact table contributes only this many, so the
pretrained model must copy answers from the demonstration; it cannot memorise the tables."""


def write_task_mix(path: Path, tasks: list[str], n_per_task: int, seed: int) -> int:
    """Pretraining documents: template(x, c) + c for ``n_per_task`` examples of each task,
    drawn with seeds ``seed + 1000 * (i + 1) + k`` (never the fine-tuning seeds)."""
    docs = [
        teacher_prompt(e) + e.demonstration
        for i, task in enumerate(tasks)
        for k in range(-(-n_per_task // MIX_EXAMPLES_PER_SEED))
        for e in make_examples(task, MIX_EXAMPLES_PER_SEED, seed=seed + 100_000 * (i + 1) + k)
    ]
    random.Random(seed).shuffle(docs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(doc + "\n" + DOC_SEPARATOR + "\n" for doc in docs), encoding="utf-8")
    return len(docs)


def write_task_data(work: Path, task: str, n_examples: int, n_probes: int, seed: int) -> tuple[Path, Path]:
    """Training examples and held-out probes of ``task`` (seeds distinct from the mix's)."""
    examples = make_examples(task, n_examples, seed)
    probes = make_probes(task, n_probes, seed, {e.prompt for e in examples})
    train, probe_file = work / "tasks" / f"{task}.jsonl", work / "tasks" / f"{task}_probes.jsonl"
    write_jsonl_atomic(train, [{"prompt": e.prompt, "demonstration": e.demonstration, **e.meta} for e in examples])
    write_jsonl_atomic(probe_file, probes)
    return train, probe_file


def trainer(args: argparse.Namespace, steps: int, name: str, callbacks: list) -> L.Trainer:
    return L.Trainer(
        max_steps=steps, accelerator="auto", devices=1, precision=args.precision, logger=TensorBoardLogger(
            Path(args.work) / "tb", name=name), callbacks=callbacks, enable_checkpointing=False,
        enable_progress_bar=args.progress, enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=5,
    )


def pretrain(args: argparse.Namespace, shards, mix_bin: Path) -> Path:
    config = ModelConfig.from_yaml(model_yaml(args.model))
    config.vocab_size = shards.vocab_size
    L.seed_everything(args.seed, verbose=False)
    module = PretrainModule(config, OptimConfig(lr=args.pretrain_lr, warmup_steps=max(1, args.pretrain_steps // 20)))
    data = PackedDataModule(train_files=[str(shards.train), str(mix_bin)], seq_len=args.seq_len,
                            batch_size=args.pretrain_batch_size, seed=args.seed, vocab_size=config.vocab_size)
    run = trainer(args, args.pretrain_steps, "pretrain", [TokenThroughput()])
    run.fit(module, data)
    ckpt = Path(args.work) / "pretrain.ckpt"
    run.save_checkpoint(ckpt, weights_only=True)
    return ckpt


def measure(ckpt: Path, tokenizer: Tokenizer, probe_files: dict[str, Path], val_bin: Path, args) -> dict:
    """Probe accuracy per task and held-out perplexity of the student in ``ckpt``."""
    model = load_backbone(ckpt, "cuda" if torch.cuda.is_available() else "cpu")
    accuracy = {}
    for task, path in probe_files.items():
        report = evaluate(model, tokenizer, None, read_probes(path), max_new_tokens=args.probe_tokens)
        accuracy[task] = report["probes"]["accuracy"]
    ppl = evaluate(model, None, [val_bin], None, seq_len=args.seq_len, max_windows=args.val_windows)["perplexity"]
    return {"accuracy": accuracy, "ppl": ppl["ppl"], "loss": ppl["loss"]}


def finetune(method: str, init: Path, task_file: Path, stage: str, args, tokenizer_path: Path) -> tuple[Path, float]:
    """``--steps`` optimizer steps of SFT or SDFT from ``init`` on ``task_file``; the checkpoint and seconds."""
    L.seed_everything(args.seed, verbose=False)
    optim = OptimConfig(lr=args.lr, warmup_steps=max(1, args.steps // 10), weight_decay=0.0, min_lr_ratio=0.1)
    common = {"init_ckpt": str(init), "tokenizer": str(tokenizer_path), "optim": optim}
    if method == "sdft":
        module = SDFTModule(sdft={"alpha": args.alpha, "max_new_tokens": args.max_new_tokens}, **common)
        callbacks = [EMATeacher(decay=args.ema_decay)]
    else:
        module, callbacks = SFTModule(**common), []
    run = trainer(args, args.steps, f"{method}_{stage}", callbacks)
    start = time.perf_counter()
    run.fit(module, SDFTDataModule(str(task_file), batch_size=args.batch_size, seed=args.seed))
    seconds = time.perf_counter() - start
    ckpt = Path(args.work) / f"{method}_{stage}.ckpt"
    run.save_checkpoint(ckpt, weights_only=True)
    return ckpt, seconds


def summarise(rows: list[dict], tasks: list[str]) -> dict:
    """R matrix (stages 0..T), ACC and BWT over ``tasks`` (GEM definitions)."""
    R = [[row["accuracy"][t] for t in tasks] for row in rows]
    T = len(tasks)
    return {
        "R": R,
        "ACC": statistics.fmean(R[T]),
        "BWT": statistics.fmean(R[T][j] - R[j + 1][j] for j in range(T - 1)),
        "ppl_before": rows[0]["ppl"],
        "ppl_after": rows[T]["ppl"],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", type=model_name, help=MODEL_HELP)
    p.add_argument("--tasks", nargs=2, default=["colors", "cities"], choices=TASKS, metavar="TASK",
                   help="task A then task B")
    p.add_argument("--pretrained", default=None, help="a checkpoint from an earlier run: skip pretraining")
    p.add_argument("--methods", nargs="+", default=["sft", "sdft"], choices=["sft", "sdft"])
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--pretrain-batch-size", type=int, default=16)
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--mix-examples", type=int, default=10_000, help="template + demonstration documents per task")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per task and method")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--alpha", type=float, default=1.0, help="SDFT divergence: 1 reverse KL, 0 forward KL")
    p.add_argument("--ema-decay", type=float, default=0.999, help="llmkit's default; the official code uses 0.99")
    p.add_argument("--max-new-tokens", type=int, default=24, help="SDFT completion length")
    p.add_argument("--examples", type=int, default=2000, help="training examples per task")
    p.add_argument("--probes", type=int, default=64, help="probes per task (fact tasks: 64 at most)")
    p.add_argument("--probe-tokens", type=int, default=24)
    p.add_argument("--val-windows", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--max-files", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="bf16-mixed" if torch.cuda.is_available() else "32-true")
    p.add_argument("--progress", action="store_true", help="show Lightning's progress bar")
    p.add_argument("--work", default="lightning_logs/bench/continual", help="data, checkpoints, TensorBoard logs")
    p.add_argument("--out", default=None, help="JSON results (default WORK/continual.json)")
    args = p.parse_args(argv)
    work = Path(args.work)

    shards = build_corpus_shards(work, "stdlib", args.vocab_size, args.max_files)
    task_files, probe_files = {}, {}
    for i, task in enumerate(args.tasks):
        task_files[task], probe_files[task] = write_task_data(work, task, args.examples, args.probes, args.seed + i)
    tokenizer = Tokenizer(shards.tokenizer)

    start = time.perf_counter()
    if args.pretrained is None:
        mix_txt = work / "mix" / "tasks.txt"
        n_docs = write_task_mix(mix_txt, args.tasks, args.mix_examples, args.seed)
        mix = pack(shards.tokenizer, [mix_txt], work / "mix" / "tasks.bin")
        print(f"pretraining mix: {shards.train_tokens:,} corpus + {mix['n_tokens']:,} task-format tokens "
              f"({n_docs:,} docs)")
        base = pretrain(args, shards, work / "mix" / "tasks.bin")
    else:
        base = Path(args.pretrained)
    pretrain_s = time.perf_counter() - start
    stage0 = measure(base, tokenizer, probe_files, shards.val, args)
    print(f"pretrained in {pretrain_s:.0f} s: accuracy {stage0['accuracy']}, val ppl {stage0['ppl']:.2f}")

    results = {}
    for method in args.methods:
        rows, init, seconds = [stage0], base, []
        for task in args.tasks:
            init, s = finetune(method, init, task_files[task], task, args, shards.tokenizer)
            seconds.append(s)
            rows.append(measure(init, tokenizer, probe_files, shards.val, args))
            print(f"{method} after {task}: accuracy {rows[-1]['accuracy']}, val ppl {rows[-1]['ppl']:.2f} ({s:.0f} s)")
        results[method] = {**summarise(rows, args.tasks), "stages": rows, "seconds": seconds}

    device = device_description()
    a, b = args.tasks
    print(f"\n{args.model}, {device}; A = {a}, B = {b}; {args.steps} steps x batch {args.batch_size} per task, "
          f"lr {args.lr}; SDFT alpha {args.alpha}, EMA {args.ema_decay}; {args.probes} probes per task")
    print(f"{'method':<6} {'R[0] (A, B)':>14} {'R[1] after A':>14} {'R[2] after B':>14} {'ACC':>6} {'BWT':>7} "
          f"{'ppl 0 -> 2':>16} {'seconds':>9}")
    for method, r in results.items():
        rows = ["{:.2f}, {:.2f}".format(*row) for row in r["R"]]
        print(f"{method:<6} {rows[0]:>14} {rows[1]:>14} {rows[2]:>14} {r['ACC']:>6.3f} {r['BWT']:>7.3f} "
              f"{r['ppl_before']:>7.2f} -> {r['ppl_after']:<6.2f} {sum(r['seconds']):>9.0f}")
    out = Path(args.out or work / "continual.json")
    write_json_atomic(out, {"args": vars(args), "device": device, "pretrain_seconds": pretrain_s, "results": results})
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
