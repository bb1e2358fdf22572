"""``llmkit generate``: sample text from a checkpoint, KV-cached and batched, optionally through
a LoRA adapter. Prompts come from ``--prompt`` or a file; completions are printed, or written
as ``{prompt, completion}`` JSONL with ``--out``.

torch is imported when the command runs, not when the module loads, so ``--help`` is instant.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from llmkit.errors import LLMKitError, SettingError
from llmkit.io import iter_jsonl_objects, iter_text_lines, refuse_overwrite, text_field, write_jsonl_atomic
from llmkit.model.config import AttentionBackend

if TYPE_CHECKING:
    from llmkit.data.tokenizer import TokenizerLike

_PROMPT_LINE = '{"prompt": "..."}'

Precision = Literal["auto", "32-true", "bf16-mixed"]
"""How ``llmkit generate`` computes, named as Lightning's ``trainer.precision`` names it."""


def read_prompts(path: Path) -> list[str]:
    """Prompts from a file: ``.jsonl`` lines of {"prompt": ...}, else one prompt per non-blank line."""
    if path.suffix.lower() == ".jsonl":
        prompts = [text_field(record, "prompt", source, _PROMPT_LINE)
                   for source, record in iter_jsonl_objects(path, "prompt", _PROMPT_LINE)]
    elif path.is_dir():
        raise LLMKitError(f"prompt file {path} is a directory: give a file of one prompt per line (or JSONL)")
    elif not path.is_file():
        raise LLMKitError(f"prompt file {path} does not exist")
    else:
        prompts = [line.rstrip("\r\n") for _, line in iter_text_lines(path) if line.strip()]
    if not prompts:
        raise LLMKitError(f"prompt file {path} has no prompts: write one prompt per line (or JSONL)")
    return prompts


def check_device(device: str) -> None:
    """Raise :class:`LLMKitError` (naming ``--device``) unless ``device`` is cpu, or a CUDA or MPS
    device this machine has."""
    import torch

    try:
        kind = torch.device(device)
    except RuntimeError:
        kind = None
    if kind is None or kind.type not in ("cpu", "cuda", "mps"):
        raise LLMKitError(f"--device {device}: not a device llmkit generates on; use cpu, cuda, cuda:N or mps")
    if kind.type == "cuda" and not torch.cuda.is_available():
        raise LLMKitError(f"--device {device}: CUDA is not available here (torch.cuda.is_available() is False); "
                          "use --device cpu")
    if kind.type == "cuda" and (kind.index or 0) >= torch.cuda.device_count():
        raise LLMKitError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if kind.type == "mps" and not torch.backends.mps.is_available():
        raise LLMKitError(f"--device {device}: MPS is not available here (torch.backends.mps.is_available() is "
                          "False); use --device cpu")


def encode_prompts(tok: TokenizerLike, texts: list[str], chat_template: bool, bos: bool,
                   max_seq_len: int) -> list[list[int]]:
    """The ids of each prompt (through the tokenizer's chat template with ``chat_template``);
    raise :class:`LLMKitError` for an empty prompt or one that leaves no room in ``max_seq_len``."""
    encoded = [tok.encode(tok.render_chat(t) if chat_template else t, bos=bos) for t in texts]
    for text, ids in zip(texts, encoded, strict=True):
        if not ids:
            raise LLMKitError("a prompt is empty: give at least one character of text (or --bos)")
        if len(ids) >= max_seq_len:
            raise LLMKitError(f"the prompt {text[:40]!r}... is {len(ids)} tokens, at or beyond the model's "
                              f"max_seq_len {max_seq_len}; shorten it")
    return encoded


def resolve_precision(precision: Precision, device: str) -> Precision:
    """``precision``, with auto made bf16-mixed on a CUDA device that has bf16 and 32-true elsewhere."""
    if precision != "auto":
        return precision
    import torch

    cuda = torch.device(device).type == "cuda"
    return "bf16-mixed" if cuda and torch.cuda.is_bf16_supported() else "32-true"


def generate(
    ckpt: Path,
    tokenizer: Path | None = None,
    prompt: str | None = None,
    prompt_file: Path | None = None,
    lora: Path | None = None,
    out: Path | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 128,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    num_samples: int = 1,
    seed: int = 0,
    bos: bool = False,
    chat_template: bool = False,
    compile: bool = False,
    device: str | None = None,
    attention_backend: AttentionBackend | None = None,
    precision: Precision = "auto",
) -> int:
    """Sample text from a checkpoint (KV-cached, batched).

    Args:
        ckpt: a .ckpt written by `llmkit pretrain fit`, a fine-tuning run or `llmkit lora merge`, or a
            model directory (a Hugging Face one, or one `llmkit convert to-hf` wrote).
        tokenizer: the tokenizer its data was packed with: a SentencePiece .model, a Hugging Face
            tokenizer.json, or a model directory holding one; default: the one the checkpoint records (or
            the model directory it is or was converted from holds).
        prompt: one prompt (or use --prompt-file).
        prompt_file: one prompt per line, or .jsonl lines of {"prompt": ...}.
        lora: a LoRA adapter (.safetensors) trained on this checkpoint.
        out: write {prompt, completion} JSONL here instead of printing.
        batch_size: prompts sampled together.
        max_new_tokens: new tokens per completion at most.
        temperature: 0 for greedy decoding.
        top_k: sample among the k most likely tokens only.
        top_p: sample within the top-p probability mass only.
        num_samples: samples per prompt.
        seed: the same seed (and batch size) gives the same samples; each batch samples its own stream.
        bos: prepend the BOS token to each prompt.
        chat_template: render each prompt as a user message through the tokenizer's chat template (a Hugging Face
            model's), the assistant's turn opened after it.
        compile: compile the decode step (CUDA graphs on GPU).
        device: where to run: cpu, cuda, cuda:N or mps (default: cuda if available, else cpu).
        attention_backend: the attention kernel (default: the checkpoint's; docs/attention.md).
        precision: bf16-mixed samples under bf16 autocast, as training under bf16-mixed does; auto
            picks it on a CUDA GPU with bf16, 32-true elsewhere.
    """
    import torch

    from llmkit.cli.lora import load_with_adapter
    from llmkit.data.tokenizer import first_tokenizer, load_tokenizer, tokenizer_record
    from llmkit.model.checkpoint import check_tokenizer, is_sharded_checkpoint, read_checkpoint, tokenizer_candidates
    from llmkit.model.generation import SamplingConfig
    from llmkit.model.generation import generate as sample

    if (prompt is None) == (prompt_file is None):
        raise LLMKitError("give exactly one of --prompt and --prompt-file")
    try:  # checked before the model loads
        config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                seed=seed, compile=compile)
    except SettingError as error:
        raise error.renamed("--" + error.setting.replace("_", "-")) from None
    for flag, value in (("--num-samples", num_samples), ("--batch-size", batch_size)):
        if value < 1:
            raise LLMKitError(f"{flag} {value}: must be 1 or more")
    if out is not None:  # before sampling, not when the completions are written
        refuse_overwrite(out, "--out", {"--prompt-file": prompt_file, "--ckpt": ckpt, "--tokenizer": tokenizer,
                                        "--lora": lora}, "write the completions to another file")
        if out.is_dir():
            raise LLMKitError(f"--out {out}: it is a directory; give the .jsonl file to write, e.g. "
                              f"{out / 'completions.jsonl'}")
    if device is not None:
        check_device(device)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    checkpoint = read_checkpoint(ckpt, device)
    model_dir = ckpt.is_dir() and not is_sharded_checkpoint(ckpt)
    tokenizer = tokenizer or first_tokenizer(tokenizer_candidates(ckpt, checkpoint))
    if tokenizer is None:
        lacks = ("has no tokenizer.json or tokenizer.model" if model_dir
                 else "records no tokenizer that is still on disk")
        raise LLMKitError(f"{ckpt} {lacks}: give --tokenizer (the .model, tokenizer.json or model directory its data "
                          f"was packed with)")
    model = load_with_adapter(checkpoint, ckpt, lora, device)
    if attention_backend is not None:
        model.config.attention_backend = attention_backend
    tok = load_tokenizer(tokenizer)
    tok.check_vocab_size(model.config.vocab_size, f"checkpoint {ckpt}")
    check_tokenizer(checkpoint, ckpt, tokenizer_record(tok.path))
    texts = read_prompts(prompt_file) if prompt_file is not None else [prompt]
    texts = [t for t in texts for _ in range(num_samples)]
    encoded = encode_prompts(tok, texts, chat_template, bos, model.config.max_seq_len)
    room = model.config.max_seq_len - max(len(ids) for ids in encoded)
    if max_new_tokens > room:
        print(f"llmkit: note: generating {room} new tokens, all the context window leaves after the "
              f"longest prompt (max_seq_len {model.config.max_seq_len})", file=sys.stderr)
    config = dataclasses.replace(config, max_new_tokens=min(max_new_tokens, room))
    bf16 = resolve_precision(precision, device) == "bf16-mixed"
    records = []
    batch_seeds = torch.Generator().manual_seed(seed)  # one seed per batch: the batches' samples differ
    for start in range(0, len(encoded), batch_size):
        config = dataclasses.replace(config, seed=int(torch.randint(2**62, (), generator=batch_seeds)))
        with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=bf16):
            result = sample(model, encoded[start : start + batch_size], config, eos_id=tok.stop_ids,
                            pad_id=tok.pad_id)
        for i, (tokens, mask) in enumerate(zip(result.tokens.tolist(), result.mask.tolist(), strict=True)):
            completion = tok.decode([t for t, real in zip(tokens, mask, strict=True) if real])
            records.append({"prompt": texts[start + i], "completion": completion})
            if out is None:
                print(texts[start + i] + completion)
                print("-" * 40)
    if out is not None:
        write_jsonl_atomic(out, records)
        print(f"wrote {len(records)} completions to {out}")
    return 0
