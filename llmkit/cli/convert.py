"""Hugging Face LLaMA-family models in, llmkit models out, dense models to mHC (docs/interop.md).

``llmkit convert {from-hf,to-hf,upcycle}``. The work is done by :mod:`llmkit.model.hf`, :mod:`llmkit.model.upcycle` and
:mod:`llmkit.model.checkpoint`; these functions name the flags, move the tokenizer files and
report. torch is imported when a command runs, so ``--help`` is instant.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from llmkit.errors import LLMKitError
from llmkit.io import new_directory_atomic, read_json, refuse_existing, refuse_overwrite

if TYPE_CHECKING:
    import torch

    from llmkit.model.config import ModelConfig

DType = Literal["auto", "bf16", "fp32"]
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
"""The special token ids a Hugging Face config.json names, which an export without a tokenizer keeps."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model")
"""The tokenizer files of a Hugging Face model directory that an export carries along."""


def _dtype(name: DType, stored: torch.dtype) -> torch.dtype:
    """The dtype ``name`` means for weights stored as ``stored``: auto keeps bf16 as bf16 and
    writes everything else as fp32."""
    import torch

    if name == "auto":
        return torch.bfloat16 if stored == torch.bfloat16 else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def _describe(config: ModelConfig, state: dict[str, torch.Tensor]) -> str:
    """One line on a model: its shape, its parameters (a tied head counted once) and its residual."""
    n_params = sum(t.numel() for name, t in state.items() if not (config.tie_embeddings and name == "lm_head.weight"))
    residual = "dense residual" if config.n_streams == 1 else f"mHC with {config.n_streams} streams"
    return (f"{config.n_layers} layers, d_model {config.d_model}, vocab {config.vocab_size}, "
            f"{n_params / 1e6:.1f}M parameters, {residual}")


def from_hf(
    model_dir: Path,
    out: Path,
    n_streams: int = 1,
    dtype: DType = "auto",
    max_seq_len: int | None = None,
    seed: int = 0,
) -> int:
    """Convert a local Hugging Face model directory into an llmkit checkpoint.

    Args:
        model_dir: config.json and *.safetensors of a Llama, Mistral, Qwen2 or Qwen3 model (no network).
        out: the checkpoint to write (.ckpt), for generate, sdft|sft|ttt fit --model.init_ckpt and lora.
        n_streams: 1 keeps the dense residual; n > 1 upcycles to mHC with n streams and logits equal to the
            dense model's (docs/interop.md).
        dtype: the weights' dtype in the checkpoint; auto keeps bf16 weights bf16 and stores others as fp32.
        max_seq_len: cap the context (default: the model's max_position_embeddings).
        seed: seed of the upcycled model's stream embedding.
    """
    refuse_overwrite(out, "--out", {"--model-dir": model_dir}, "give the path of the .ckpt file to write")
    refuse_existing(out, "--out", "give the path of a new .ckpt file to write")
    if n_streams < 1:
        raise LLMKitError(f"--n-streams {n_streams}: 1 keeps the dense residual, 2 or more upcycles to mHC")
    if max_seq_len is not None and max_seq_len < 1:
        raise LLMKitError(f"--max-seq-len {max_seq_len}: must be 1 or more (leave it out for the model's context)")

    from llmkit.data.tokenizer import directory_tokenizer, tokenizer_record
    from llmkit.model.checkpoint import TOKENIZER_KEY, write_backbone_checkpoint
    from llmkit.model.hf import read_hf_config, read_hf_model, tie_head
    from llmkit.model.upcycle import upcycle_state

    config, state = read_hf_model(model_dir, max_seq_len=max_seq_len)
    if max_seq_len is not None and config.max_seq_len < max_seq_len:
        print(f"llmkit: note: --max-seq-len {max_seq_len} is beyond the model's max_position_embeddings; the context "
              f"stays {config.max_seq_len}", file=sys.stderr)
    stored = {name: t for name, t in state.items() if not (config.tie_embeddings and name == "lm_head.weight")}
    state = tie_head(config, {name: t.to(_dtype(dtype, t.dtype)) for name, t in stored.items()})
    if n_streams != 1:
        config, state = upcycle_state(config, state, n_streams, seed)
    hf_config = read_hf_config(model_dir)
    file = directory_tokenizer(Path(model_dir))
    learned = {TOKENIZER_KEY: tokenizer_record(file)} if file is not None else {}
    write_backbone_checkpoint(out, config, state, converted_from={
        "model_dir": str(Path(model_dir).resolve()), "model_type": hf_config["model_type"], "n_streams": n_streams,
        "special_token_ids": {key: hf_config[key] for key in SPECIAL_IDS if hf_config.get(key) is not None},
    }, **learned)
    kinds = sorted({str(t.dtype).removeprefix("torch.") for t in state.values()})
    print(f"wrote {out}: {hf_config['model_type']} {_describe(config, state)}, {'/'.join(kinds)}")
    if file is not None:
        print(f"  its tokenizer is {file}, which generate and to-hf take by default, e.g. "
              f"llmkit generate --ckpt {out} --prompt ...")
    else:
        print(f"  {model_dir} has no tokenizer files: give the model's tokenizer as --tokenizer when you use it")
    return 0


def to_hf(
    ckpt: Path,
    out: Path,
    tokenizer: Path | None = None,
    lora: Path | None = None,
    merge_lora: bool = True,
    dtype: DType = "auto",
) -> int:
    """Export a checkpoint: a Hugging Face model directory (one residual stream, dense, standard
    attention) or an llmkit model directory (mHC, MoE, latent attention), with the tokenizer's files.

    Args:
        ckpt: a checkpoint (or model directory) llmkit reads.
        out: the directory to write: a new one, or an empty one.
        tokenizer: the model's tokenizer (.model, tokenizer.json or a model directory); default: the one the
            checkpoint was trained or converted with.
        lora: a LoRA adapter (.safetensors) trained on this checkpoint.
        merge_lora: merge the adapter into the weights; with --no-merge-lora it is written beside them, in PEFT's
            layout (OUT/adapter), for a Hugging Face export.
        dtype: the weights' dtype; auto keeps bf16 weights bf16 and writes others as fp32.
    """
    refuse_overwrite(out, "--out", {"--ckpt": ckpt, "--tokenizer": tokenizer, "--lora": lora},
                     "write the exported model to a new directory")

    from llmkit.cli.lora import load_with_adapter, refuse_second_adapter
    from llmkit.data.tokenizer import first_tokenizer, load_tokenizer, tokenizer_record
    from llmkit.model.checkpoint import check_tokenizer, read_checkpoint, save_model_dir, tokenizer_candidates
    from llmkit.model.hf import hf_exportable, save_hf_model, save_peft_adapter
    from llmkit.model.lora import merged_base_state, read_lora

    checkpoint = read_checkpoint(ckpt)
    stored = checkpoint["state_dict"]["model.tok_emb.weight"].dtype
    if not merge_lora:  # load_with_adapter refuses it when given the adapter to merge
        refuse_second_adapter(checkpoint, ckpt, lora)
    model = load_with_adapter(checkpoint, ckpt, lora if merge_lora else None)
    config = model.config
    if lora is not None and not merge_lora and not hf_exportable(config):
        raise LLMKitError("--no-merge-lora exports the adapter in PEFT's layout, which needs a model transformers "
                          "can load; this one (mHC, MoE or latent attention) is not: merge the adapter (the default)")
    state = merged_base_state(model) if lora is not None and merge_lora else model.state_dict()
    tokenizer = tokenizer or first_tokenizer(tokenizer_candidates(ckpt, checkpoint))
    special: dict[str, int | list[int] | None] = {}
    generation: dict = {}
    if tokenizer is None:  # what the source model's directory gave, if it was converted from one
        source = checkpoint.get("converted_from", {})
        special = source.get("special_token_ids", {})
        if source.get("model_dir") and Path(source["model_dir"]).is_dir():
            generation = _source_generation_config(Path(source["model_dir"]))
    else:
        tok = load_tokenizer(tokenizer)
        tok.check_vocab_size(config.vocab_size, f"checkpoint {ckpt}")
        check_tokenizer(checkpoint, ckpt, tokenizer_record(tok.path))
        stops = list(tok.stop_ids)  # a chat model's end of turn too: eos_token_id lists every id it stops at
        special = {"bos_token_id": tok.bos_id if tok.bos_id >= 0 else None,
                   "eos_token_id": stops[0] if len(stops) == 1 else stops, "pad_token_id": tok.pad_id}
        generation = _source_generation_config(Path(tokenizer))
    out_dtype = _dtype(dtype, stored)
    with new_directory_atomic(out, "exported model") as tmp:
        if hf_exportable(config):
            save_hf_model(config, state, tmp, out_dtype, special, generation)
        else:
            save_model_dir(config, state, tmp, out_dtype, special)
        if tokenizer is not None:
            _copy_tokenizer(Path(tokenizer), tmp)
        if lora is not None and not merge_lora:
            tensors, lora_config, _ = read_lora(lora)
            save_peft_adapter(tensors, lora_config, tmp / "adapter")
    kind = "a Hugging Face" if hf_exportable(config) else "an llmkit"
    print(f"wrote {out}: {kind} model directory, {_describe(config, state)}, "
          f"{str(out_dtype).removeprefix('torch.')}")
    if tokenizer is None:
        print("  no tokenizer: the checkpoint names none; pass --tokenizer to include its files")
    if lora is not None:
        print(f"  LoRA adapter {lora}: " + ("merged into the weights" if merge_lora else f"written to {out}/adapter"))
    return 0


def upcycle(ckpt: Path, out: Path, n_streams: int = 4, seed: int = 0) -> int:
    """Turn a dense checkpoint into an mHC one whose logits equal the dense model's (docs/interop.md).

    Args:
        ckpt: a one-stream checkpoint (or model directory) llmkit reads.
        out: the checkpoint to write (.ckpt).
        n_streams: residual streams of the mHC model.
        seed: seed of the stream embedding.
    """
    refuse_overwrite(out, "--out", {"--ckpt": ckpt}, "write the upcycled checkpoint to another file")
    refuse_existing(out, "--out", "write the upcycled checkpoint to a new file")

    from llmkit.model.checkpoint import (
        backbone_state,
        model_config_dict,
        read_checkpoint,
        tokenizer_link,
        write_backbone_checkpoint,
    )
    from llmkit.model.config import ModelConfig
    from llmkit.model.upcycle import upcycle_state

    checkpoint = read_checkpoint(ckpt)
    dense = ModelConfig.from_dict(model_config_dict(checkpoint))
    config, state = upcycle_state(dense, backbone_state(checkpoint, ckpt), n_streams, seed)
    write_backbone_checkpoint(out, config, state, upcycled_from=str(Path(ckpt).resolve()),
                              **tokenizer_link(ckpt, checkpoint))
    print(f"wrote {out}: {_describe(config, state)}, logits equal to {ckpt}'s at initialisation")
    return 0


def _source_generation_config(tokenizer: Path) -> dict:
    """The ``generation_config.json`` of the model directory a Hugging Face tokenizer comes from
    (its sampling defaults: ``do_sample``, ``temperature``, ``top_p``...), or {}."""
    source = tokenizer if tokenizer.is_dir() else tokenizer.parent
    path = source / "generation_config.json"
    if tokenizer.suffix == ".model" or not path.is_file():
        return {}
    return read_json(path, "the model directory's generation config; fix or remove it")


def _copy_tokenizer(tokenizer: Path, out_dir: Path) -> None:
    """Copy a tokenizer's files into ``out_dir`` as a Hugging Face model directory holds them: a
    ``tokenizer.json`` with the files beside it, a model directory's tokenizer files, or a
    SentencePiece model as ``tokenizer.model`` with a ``tokenizer_config.json`` naming its specials
    and whether it prefixes a space (``add_prefix_space``, as sentencepiece's ``add_dummy_prefix``;
    llmkit trains without), so that ``transformers`` encodes as llmkit does."""
    if tokenizer.suffix == ".model":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
        shutil.copyfile(tokenizer, out_dir / "tokenizer.model")
        piece = {name: sp.IdToPiece(i) if i >= 0 else None
                 for name, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("pad_token", sp.pad_id()),
                                 ("unk_token", sp.unk_id()))}
        dummy_prefix = sp.EncodeAsPieces("a")[0].startswith("\u2581")  # sentencepiece's add_dummy_prefix
        config = {"tokenizer_class": "LlamaTokenizer", **piece, "add_bos_token": False, "add_eos_token": False,
                  "add_prefix_space": dummy_prefix}
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return
    source = tokenizer if tokenizer.is_dir() else tokenizer.parent
    if not tokenizer.is_dir():
        shutil.copyfile(tokenizer, out_dir / "tokenizer.json")
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and not (out_dir / name).exists():
            shutil.copyfile(source / name, out_dir / name)
