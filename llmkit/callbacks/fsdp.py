"""BlockFSDPStrategy: Lightning's FSDPStrategy set up for llmkit's backbone (docs/scaling_out.md).

Pretraining a backbone whose weights, gradients and AdamW state outgrow one GPU. It is
Lightning's ``FSDPStrategy`` (PyTorch FSDP with flat parameters) with these settings:

- **Wrap policy: one FSDP unit per** ``Block``. Each transformer block's parameters (attention,
  MLP, its two mHC mappings) are sharded over the ranks and gathered for that block's forward and
  backward only; the embeddings, the stream embedding, the final norm and the LM head form the
  root unit. ``PretrainModule`` builds the backbone in ``configure_model``, on each rank's GPU,
  and the strategy shards it block by block.
- **Activation checkpointing per** ``Block`` **is the backbone's own**
  (``model.config.gradient_checkpointing``: a non-reentrant checkpoint inside ``Block.forward``,
  which compiled blocks trace). FSDP's ``activation_checkpointing_policy`` is not set: with both,
  every block would be recomputed twice.
- **Mixed precision as on one GPU.** Under ``bf16-mixed`` (or ``16-mixed``) the parameters, the
  gradient reduction and the buffers stay fp32 and autocast computes in bf16; Lightning's FSDP
  default for a ``-mixed`` precision casts every parameter and buffer to bf16, which would round
  the mHC mapping's scalars (alphas, biases) and the RoPE tables that llmkit keeps in fp32. The
  price is fp32 all-gathers: twice the traffic of bf16 ones. ``*-true`` precisions are Lightning's.
- **mHC's scalar parameters.** The alphas of every ``MHCMapping`` are 0-dimensional tensors; FSDP's
  flat parameters take them as they are (FSDP2's ``fully_shard`` refuses 0-dimensional
  parameters, one reason this is the FSDP1-based strategy).
- **Sharded checkpoints** (``state_dict_type: sharded``, the default here): every rank writes
  its shard into a ``.ckpt`` folder, in parallel and without gathering the model on one rank.
  ``llmkit pretrain validate --ckpt_path``, ``llmkit generate`` and ``init_ckpt`` read such a
  folder in one process (:mod:`llmkit.model.checkpoint`); resuming training from it takes this
  strategy again. ``full`` gathers everything on rank 0 and writes one file.
- **CUDA only**: on any other accelerator it stops at setup with one line (FSDP has no CPU
  backend).

Muon (``optim.name: muon``) needs whole weight matrices and is refused under it; the
fine-tuning modules and the regression gate run the whole backbone outside the training
forward and refuse it too (they scale out with DDP).
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import MixedPrecision

from llmkit.errors import LLMKitError
from llmkit.model.transformer import Block


class BlockFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` with one FSDP unit per ``Block``, fp32 parameters under ``-mixed``
    precision and sharded checkpoints (see the module docstring).

    Args:
        sharding_strategy: ``FULL_SHARD`` (parameters, gradients and optimizer state sharded),
            ``SHARD_GRAD_OP`` (parameters kept whole between forward and backward), ``HYBRID_SHARD``
            (sharded within a node, replicated across nodes; see ``device_mesh``) or ``NO_SHARD``.
        state_dict_type: ``sharded`` (each rank writes its shard into a checkpoint folder) or
            ``full`` (one file, gathered on rank 0).
        cpu_offload: keep the sharded parameters and gradients in CPU memory between uses.
        device_mesh: (replicas, shard size) for ``HYBRID_SHARD``, e.g. (nodes, GPUs per node).
    """

    def __init__(
        self,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "FULL_SHARD",
        state_dict_type: Literal["full", "sharded"] = "sharded",
        cpu_offload: bool = False,
        device_mesh: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(
            auto_wrap_policy={Block}, sharding_strategy=sharding_strategy, state_dict_type=state_dict_type,
            cpu_offload=cpu_offload, device_mesh=device_mesh,
        )

    @property
    def mixed_precision_config(self) -> MixedPrecision | None:
        """fp32 parameters, reduction and buffers under a ``-mixed`` precision (autocast computes in
        the low precision); Lightning's configuration otherwise."""
        if self.mixed_precision is None and str(self.precision_plugin.precision).endswith("-mixed"):
            return MixedPrecision(param_dtype=torch.float32, reduce_dtype=torch.float32, buffer_dtype=torch.float32)
        return super().mixed_precision_config

    def setup_environment(self) -> None:
        if self.root_device.type != "cuda":
            raise LLMKitError(
                f"BlockFSDPStrategy shards the backbone over CUDA GPUs, and this run is on {self.root_device.type}: "
                "set trainer.accelerator: gpu, or use trainer.strategy: ddp (docs/scaling_out.md)"
            )
        super().setup_environment()
