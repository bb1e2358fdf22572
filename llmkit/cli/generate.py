"""The `llmkit generate` and `llmkit lora merge` subcommands.

    llmkit generate --ckpt CKPT --tokenizer TOK (--prompt TEXT | --prompt-file FILE) [--lora ADAPTER]
    llmkit lora merge --ckpt BASE.ckpt --lora ADAPTER.safetensors --out MERGED.ckpt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import lightning
import torch

from llmkit.checkpoint import backbone_from_checkpoint, load_backbone, read_checkpoint
from llmkit.data.corpus import write_json_atomic, write_jsonl_atomic
from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import LLMKitError
from llmkit.model.generation import SamplingConfig, generate
from llmkit.model.lora import base_fingerprint, load_lora, lora_layers, merge_lora
from llmkit.model.transformer import Transformer


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: ``.jsonl`` lines of {"prompt": ...}, else one prompt per line."""
    path = Path(path)
    if not path.is_file():
        raise LLMKitError(f"prompt file {path} does not exist")
    prompts = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if path.suffix != ".jsonl":
                prompts.append(line.rstrip("\r\n"))
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LLMKitError(
                    f"{path}:{number}: not valid JSON ({e.msg}); each line must be {{\"prompt\": ...}}"
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise LLMKitError(f'{path}:{number}: expected an object with a string "prompt" field')
            prompts.append(record["prompt"])
    if not prompts:
        raise LLMKitError(f"prompt file {path} has no prompts: write one prompt per line (or JSONL)")
    return prompts


def attach_adapter(model: Transformer, lora: str | None) -> Transformer:
    """``model`` with the LoRA adapter at ``lora`` applied, if given (checked to belong to it)."""
    if lora:
        load_lora(model, lora, expected_base_sha256=base_fingerprint(model))
        model.eval()
    return model


def run_generate(args: argparse.Namespace) -> int:
    model = attach_adapter(load_backbone(args.ckpt, map_location=args.device), args.lora)
    tokenizer = Tokenizer(args.tokenizer)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise LLMKitError(
            f"tokenizer {args.tokenizer} has vocab_size {tokenizer.vocab_size} but checkpoint "
            f"{args.ckpt} was trained with {model.config.vocab_size}; use the tokenizer it was trained with"
        )
    texts = read_prompts(args.prompt_file) if args.prompt_file else [args.prompt]
    texts = [t for t in texts for _ in range(args.num_samples)]
    encoded = [tokenizer.encode(t, bos=args.bos) for t in texts]
    for text, ids in zip(texts, encoded, strict=True):
        if not ids:
            raise LLMKitError("a prompt is empty: give at least one character of text (or --bos)")
        if len(ids) >= model.config.max_seq_len:
            raise LLMKitError(
                f"the prompt {text[:40]!r}... is {len(ids)} tokens, at or beyond the model's max_seq_len "
                f"{model.config.max_seq_len}; shorten it"
            )
    room = model.config.max_seq_len - max(len(ids) for ids in encoded)
    if args.max_new_tokens > room:
        print(f"llmkit: note: generating {room} new tokens, all the context window leaves after the "
              f"longest prompt (max_seq_len {model.config.max_seq_len})", file=sys.stderr)
    config = SamplingConfig(
        max_new_tokens=min(args.max_new_tokens, room), temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, compile=args.compile,
    )
    records = []
    for start in range(0, len(encoded), args.batch_size):
        batch = encoded[start : start + args.batch_size]
        out = generate(model, batch, config, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        for i, (tokens, mask) in enumerate(zip(out.tokens.tolist(), out.mask.tolist(), strict=True)):
            completion = tokenizer.decode([t for t, real in zip(tokens, mask, strict=True) if real])
            records.append({"prompt": texts[start + i], "completion": completion})
            if not args.out:
                print(texts[start + i] + completion)
                print("-" * 40)
    if args.out:
        write_jsonl_atomic(Path(args.out), records)
        print(f"wrote {len(records)} completions to {args.out}")
    return 0


def run_lora_merge(args: argparse.Namespace) -> int:
    """Write a checkpoint whose weights are W0 + (alpha/r) B A: a plain backbone again."""
    ckpt = read_checkpoint(args.ckpt)
    model = attach_adapter(backbone_from_checkpoint(ckpt, args.ckpt), args.lora)
    n = len(lora_layers(model))
    merge_lora(model)
    state = {f"model.{k}": v for k, v in model.state_dict().items() if ".lora_" not in k}
    merged = {
        "hyper_parameters": ckpt["hyper_parameters"],
        "hparams_name": "kwargs",
        "pytorch-lightning_version": lightning.__version__,
        "state_dict": state,
        "merged_lora": {"adapter": str(Path(args.lora).resolve()), "base": str(Path(args.ckpt).resolve())},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(merged, tmp)
    os.replace(tmp, out)
    write_json_atomic(out.with_name(out.name + ".json"), merged["merged_lora"] | {"layers": n})
    print(f"wrote {out}: {n} LoRA layers merged into the base weights")
    return 0


def add_generate_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="sample text from a checkpoint (KV-cached, batched)")
    p.add_argument("--ckpt", required=True, help="a .ckpt written by `llmkit pretrain fit` or `llmkit lora merge`")
    p.add_argument("--tokenizer", required=True, help="the SentencePiece .model used to pack its data")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt")
    source.add_argument("--prompt-file", help="one prompt per line, or .jsonl lines of {\"prompt\": ...}")
    p.add_argument("--lora", help="a LoRA adapter (.safetensors) trained on this checkpoint")
    p.add_argument("--out", help="write {prompt, completion} JSONL here instead of printing")
    p.add_argument("--batch-size", type=int, default=16, help="prompts sampled together")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bos", action="store_true", help="prepend the BOS token to each prompt")
    p.add_argument("--compile", action="store_true", help="compile the decode step (CUDA graphs on GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=run_generate)


def add_lora_commands(subparsers: argparse._SubParsersAction) -> None:
    lora = subparsers.add_parser("lora", help="LoRA adapter tools")
    commands = lora.add_subparsers(dest="lora_command", metavar="COMMAND", required=True)
    merge = commands.add_parser("merge", help="merge an adapter into its base checkpoint's weights")
    merge.add_argument("--ckpt", required=True, help="the base checkpoint the adapter was trained on")
    merge.add_argument("--lora", required=True, help="the adapter (.safetensors)")
    merge.add_argument("--out", required=True, help="the merged checkpoint to write")
    merge.set_defaults(func=run_lora_merge)
