"""LoRA adapter tools: merge an adapter into its base checkpoint's weights.

``llmkit lora merge`` is the one command that writes an adapter into base weights (docs/lora.md).

torch is imported when the command runs, not when the module loads, so ``--help`` is instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from llmkit.errors import LLMKitError
from llmkit.io import refuse_existing, refuse_overwrite, write_json_atomic

if TYPE_CHECKING:
    from llmkit.model.transformer import Transformer


def load_with_adapter(checkpoint: dict, ckpt: Path, lora: Path | None, device: str = "cpu") -> Transformer:
    """The backbone of the checkpoint ``ckpt`` (read as ``checkpoint``) in eval mode, with the LoRA
    adapter at ``lora`` applied if given, checked to have been trained on this base."""
    from llmkit.model.checkpoint import backbone_from_checkpoint
    from llmkit.model.lora import base_fingerprint, load_lora

    refuse_second_adapter(checkpoint, ckpt, lora)
    model = backbone_from_checkpoint(checkpoint, ckpt, device)
    if lora is not None:
        load_lora(model, lora, expected_base_sha256=base_fingerprint(model))
    return model.eval()


def refuse_second_adapter(checkpoint: dict, ckpt: Path, lora: Path | None) -> None:
    """A one-line error if ``lora`` is given for a checkpoint that holds an adapter already (a TTT-Discover
    run's, read with its adapter merged)."""
    from llmkit.model.checkpoint import holds_adapter

    if lora is not None and holds_adapter(checkpoint):
        raise LLMKitError(
            f"{ckpt} is a TTT-Discover checkpoint, which holds its adapter and is read with it merged: pass it "
            f"without --lora, or pass the run's base checkpoint (its model.init_ckpt) with --lora {lora}"
        )


def merge(ckpt: Path, lora: Path, out: Path) -> int:
    """Merge an adapter into its base checkpoint's weights: W0 + (alpha/r) B A, a plain backbone again.

    Args:
        ckpt: the base checkpoint the adapter was trained on.
        lora: the adapter (.safetensors).
        out: the merged checkpoint to write (and OUT.json saying what was merged).
    """
    refuse_overwrite(out, "--out", {"--ckpt": ckpt, "--lora": lora}, "write the merged checkpoint to another file")
    refuse_existing(out, "--out", "write the merged checkpoint to a new file")

    import lightning

    from llmkit.model.checkpoint import WRITER_KEY, read_checkpoint, tokenizer_link, write_backbone_checkpoint
    from llmkit.model.lora import lora_layers, merged_base_state

    checkpoint = read_checkpoint(ckpt)
    model = load_with_adapter(checkpoint, ckpt, lora)
    n = len(lora_layers(model))
    merged_lora = {"adapter": str(lora.resolve()), "base": str(ckpt.resolve())}
    base = checkpoint["state_dict"]
    state = {k: v.to(base[f"model.{k}"].dtype) if f"model.{k}" in base else v  # a bf16 base stays bf16
             for k, v in merged_base_state(model).items()}
    write_backbone_checkpoint(
        out, model.config, state, hyper_parameters=checkpoint.get("hyper_parameters", {}), hparams_name="kwargs",
        merged_lora=merged_lora, **tokenizer_link(ckpt, checkpoint),
        **{"pytorch-lightning_version": lightning.__version__},
        **({WRITER_KEY: checkpoint[WRITER_KEY]} if WRITER_KEY in checkpoint else {}),  # the hparams' module
    )
    write_json_atomic(out.with_name(out.name + ".json"), merged_lora | {"layers": n})
    print(f"wrote {out}: {n} LoRA layers merged into the base weights")
    return 0
