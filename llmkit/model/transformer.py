"""The decoder: token embedding -> n residual streams -> L blocks -> mean read-out -> logits.

With n_streams = 1 each block is the plain pre-norm residual
    x = x + Attn(norm(x));  x = x + MLP(norm(x)).
With n_streams = n > 1 the stream is X [B, T, n, C], initialised as the token embedding plus
a learnable per-stream embedding (so the streams start distinct), and each sublayer sits inside
an :class:`~llmkit.model.mhc.MHCResidual` (mHC around attention and around the MLP, as in the mHC paper).
The read-out averages the streams, i(X) = 1/n 1^T X, the quantity H_res preserves.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmkit.model import mhc_ops
from llmkit.model.config import ModelConfig
from llmkit.model.kv_cache import KVCache
from llmkit.model.layers import CausalSelfAttention, RMSNorm, SwiGLU, rope_cache, upcast
from llmkit.model.mhc import MHCResidual, Pending, finish, recompute_first_mapping, reshape_scalar_alphas
from llmkit.model.mla import MultiHeadLatentAttention
from llmkit.model.moe import GroupedLinear, MoEFeedForward


class Block(nn.Module):
    """Attention and MLP sublayers, each pre-normed, each with its own residual connection. The
    MLP is the dense SwiGLU, or a mixture of experts in the layers ``config.moe`` names."""

    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = MultiHeadLatentAttention(config) if config.attention == "mla" else CausalSelfAttention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.uses_moe = config.moe.is_moe_layer(layer)
        self.mlp = MoEFeedForward(config) if self.uses_moe else SwiGLU(config)
        self.config = config
        self.uses_mhc = config.n_streams > 1
        if self.uses_mhc:
            self.attn_res = MHCResidual(config)
            self.mlp_res = MHCResidual(config)

    def forward(
        self,
        x: torch.Tensor | Pending,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache_pos: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
        real_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor | Pending:
        """One block; with ``config.gradient_checkpointing`` in training, its activations are
        recomputed in backward. The checkpoint sits inside this forward so that a compiled block
        (``Transformer.compile_blocks``) traces it and recomputes the fused kernels too. With
        ``config.mhc.recompute_stream`` instead, a compiled block recomputes only its attention
        sublayer's stream (:func:`~llmkit.model.mhc.recompute_first_mapping`).
        ``token_ids`` [B, T] are the tokens at these positions (the MoE hash router reads them),
        ``real_tokens`` [B, T] False where they are padding (left out of the MoE balancing).
        With mHC the stream comes in and goes out :class:`~llmkit.model.mhc.Pending` (the first
        block takes the embedded stream X [B, T, n, C])."""
        training = self.training and torch.is_grad_enabled()
        if self.config.gradient_checkpointing and training:
            x = checkpoint(self.sublayers, x, cos, sin, mask, kv_cache, cache_pos, token_ids, real_tokens,
                           use_reentrant=False)
        elif self.recomputes_stream() and training and torch.compiler.is_compiling():
            # eager, selective checkpointing would keep every other op's output: compiled blocks only
            x = checkpoint(self.sublayers, x, cos, sin, mask, kv_cache, cache_pos, token_ids, real_tokens,
                           use_reentrant=False, context_fn=recompute_first_mapping)
        else:
            x = self.sublayers(x, cos, sin, mask, kv_cache, cache_pos, token_ids, real_tokens)
        if self.uses_moe and self.training:
            self.mlp.router.add_routed_to_load()
        return x

    def recomputes_stream(self) -> bool:
        """Whether training recomputes the attention sublayer's stream (``config.mhc.recompute_stream``,
        read when called: a run from a checkpoint sets it after the model is built); not with MoE,
        whose router updates load buffers in place, which selective checkpointing refuses."""
        return self.uses_mhc and self.config.mhc.recompute_stream and not self.uses_moe

    def sublayers(
        self,
        x: torch.Tensor | Pending,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None,
        cache_pos: torch.Tensor | None,
        token_ids: torch.Tensor | None = None,
        real_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor | Pending:
        def attn(h: torch.Tensor) -> torch.Tensor:
            return self.attn(self.attn_norm(h), cos, sin, mask, kv_cache, cache_pos)

        def mlp(h: torch.Tensor) -> torch.Tensor:
            return self.mlp(self.mlp_norm(h), token_ids, real_tokens) if self.uses_moe else self.mlp(self.mlp_norm(h))

        if not self.uses_mhc:
            x = x + attn(x)
            return x + mlp(x)
        x = self.attn_res(x, attn)
        return self.mlp_res(x, mlp)


def _load_scalar_alphas(module: nn.Module, state_dict: dict, *_: object) -> None:
    """``load_state_dict`` pre-hook of :class:`Transformer`, once per load (a Lightning module's
    included): weights with the mHC mappings' alphas 0-d still load."""
    reshape_scalar_alphas(state_dict)


def _out_of_graph_pool(x: torch.Tensor | Pending) -> torch.Tensor | Pending:
    """A block's output (the stream, or mHC's :class:`Pending` one) copied out of the memory of the
    CUDA graph that made it, unless the output is part of a graph awaiting its backward (it
    requires grad), whose memory CUDA-graph trees keep until that backward has run."""
    if isinstance(x, torch.Tensor):
        return x if x.requires_grad else x.clone()
    return x if x.x.requires_grad else Pending(*(t.clone() for t in x))


class Transformer(nn.Module):
    """LLaMA-style decoder with an mHC residual: forward(idx [B,T]) -> logits [B,T,V] in fp32
    (fp64 for an fp64 model)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        if config.n_streams > 1:
            self.stream_emb = nn.Parameter(torch.zeros(config.n_streams, config.d_model))
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_cache(config.max_seq_len, config.rope_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.blocks_replay_cuda_graphs = False  # compile_blocks in a CUDA-graph mode sets it
        self.reset_parameters()
        self.register_load_state_dict_pre_hook(_load_scalar_alphas)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, init_std) for embeddings and linear maps; the residual output projections
        (o_proj, down_proj, the experts' too) scaled by 1/sqrt(2 L) as in GPT-2; mHC biases as
        :meth:`MHCMapping.reset_biases` says."""
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, GroupedLinear)):
                scale = (2 * self.config.n_layers) ** -0.5 if name.endswith(("o_proj", "down_proj")) else 1.0
                nn.init.normal_(module.weight, std=std * scale)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        for block in self.blocks:
            if block.uses_mhc:
                for res in (block.attn_res, block.mlp_res):
                    res.mapping.reset_biases()
                    for alpha in (res.mapping.alpha_pre, res.mapping.alpha_post, res.mapping.alpha_res):
                        alpha.fill_(self.config.mhc.alpha_init)
        if self.config.n_streams > 1:
            nn.init.normal_(self.stream_emb, std=std)

    def forward(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_pos: torch.Tensor | None = None,
        real_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] for tokens idx [B, T].

        Training calls forward(idx): positions 0..T-1 and the causal mask. Padded batches
        and cached decoding (llmkit.model.generation) also pass per-row RoPE ``positions``
        [B, T], a boolean attention ``mask`` [B, 1, T, S], and a ``kv_cache`` whose slots
        ``cache_pos`` [T] receive this call's keys and values; a padded batch that trains passes
        ``real_tokens`` [B, T], False on padding, which MoE layers leave out of their balancing.
        """
        T = idx.size(1)
        if positions is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        x = self.tok_emb(idx)
        if self.config.n_streams > 1:
            x = x.unsqueeze(2) + self.stream_emb  # [B, T, n, C]
        device = x.device.type
        if self.config.bf16_residual and torch.is_autocast_enabled(device) \
                and torch.get_autocast_dtype(device) == torch.bfloat16:
            x = x.to(torch.bfloat16)  # sublayer outputs are bf16 under autocast: the adds stay bf16
        copy_between_blocks = self.blocks_replay_cuda_graphs and not torch.compiler.is_compiling()
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, kv_cache.layer(i) if kv_cache is not None else None, cache_pos, idx,
                      real_tokens)
            if copy_between_blocks:
                x = _out_of_graph_pool(x)
        if self.config.n_streams > 1:
            x = finish(x, self.config.mhc.use_triton).mean(dim=2)
        return upcast(self.lm_head(self.norm(x)))

    def compile_blocks(self, mode: str | None = None) -> None:
        """torch.compile each block in place. Blocks share one code path and, with parameters
        traced as inputs, one compiled graph (with mHC two: the first block takes the embedded
        stream, the others the previous block's Pending one): compile time is that of a block or
        two, not of the depth (each mHC residual is one opaque custom op forward and one
        backward, llmkit/model/mhc_ops.py). ``mode`` is torch.compile's: "reduce-overhead"
        replays each block's forward and backward as CUDA graphs, which takes the host's time
        between kernels out of the step (docs/performance.md: 120m n = 4 on an H200, 51.4 ms
        against 59.5).

        With CUDA graphs, :meth:`forward` copies each block's output before the next block reads
        it wherever no backward is pending (validation, sampling): there every block's call begins
        a new "generation" of PyTorch's CUDA-graph trees, which invalidates the previous block's
        output, the next block's input (PyTorch issue 152887). The Lightning modules do not offer
        the mode yet: their GPU test (validate, fit, validate) failed on an H200 before this copy
        existed, and has not run since (docs/performance.md)."""
        from torch._inductor import list_mode_options  # inductor's import is slow: only where compiling

        mhc_ops.allow_inductor_fallbacks()
        for block in self.blocks:
            block.compile(mode=mode)
        self.blocks_replay_cuda_graphs = mode is not None and bool(
            list_mode_options(mode).get("triton.cudagraphs", False))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (targets are idx shifted by one)."""
        logits = self.forward(idx)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
        return n

    def active_params(self, non_embedding: bool = False) -> int:
        """The parameters one token uses: all of them, except that of each MoE layer's routed
        experts only top_k of n_experts count."""
        n = self.num_params(non_embedding)
        for block in self.blocks:
            if block.uses_moe:
                experts = sum(p.numel() for p in block.mlp.experts.parameters())
                n -= experts - experts * self.config.moe.top_k // self.config.moe.n_experts
        return n

    def summary(self) -> str:
        """The model in one line: its sizes and the options that shape it, with parameter counts
        (the total, without the embedding, and with MoE the :meth:`active_params` per token)."""
        c = self.config
        heads = f"{c.n_heads} heads" + (f" ({c.n_kv_heads} kv)" if c.n_kv_heads != c.n_heads else "")
        parts = [f"{c.n_layers} layers", f"d_model {c.d_model}", heads]
        if c.attention == "mla":
            parts.append(f"latent attention (kv rank {c.mla.kv_lora_rank})")
        if c.moe.n_experts:
            parts.append(f"MoE {c.moe.n_experts} experts, top-{c.moe.top_k}")
        parts.append(f"mHC {c.n_streams} streams" if c.n_streams > 1 else "one residual stream")
        counts = f"{self.num_params() / 1e6:.2f}M parameters, {self.num_params(non_embedding=True) / 1e6:.2f}M " \
                 "without the embedding"
        if c.moe.n_experts:
            counts += f", {self.active_params(non_embedding=True) / 1e6:.2f}M active per token"
        return f"{', '.join(parts)}; {counts}"

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 N_active (non-embedding matmuls a token goes through, forward +
        backward: :meth:`active_params`; a tied LM head, which ``non_embedding`` leaves out with the
        embedding it is, is still a V x C matmul and counts) plus 6 L T H (d_qk + d_v) for attention
        scores and values (PaLM appendix B's 12 L C T when the heads' query/key and value widths
        d_qk = d_v sum to C; MLA's are d_h + d_h^R and d_v)."""
        c = self.config
        d_qk, d_v = (c.mla.qk_nope_head_dim + c.mla.qk_rope_head_dim, c.mla.v_head_dim) if c.attention == "mla" \
            else (c.head_dim, c.head_dim)
        matmuls = self.active_params(non_embedding=True) + (c.vocab_size * c.d_model if c.tie_embeddings else 0)
        return 6 * matmuls + 6 * c.n_layers * seq_len * c.n_heads * (d_qk + d_v)

    def matmul_only_params(self) -> list[tuple[nn.Module, str]]:
        """(module, name) of each parameter that the forward uses only as a matmul operand, so
        that under autocast it only ever meets autocast's cast: the weight and bias of every
        nn.Linear and GroupedLinear (LoRA's factors included). Left out: the projections whose
        weight is read directly, mHC's phi (the mHC ops take it: fp32 on their PyTorch path),
        MLA's kv_b_proj (the absorbed decode adds a LoRA update to it first) and the MoE router's
        gate (fp32 outside autocast), and any parameter another module also holds (a tied lm_head
        is the embedding, looked up)."""
        owners = Counter(id(p) for module in self.modules() for p in module.parameters(recurse=False))
        read_directly = set()
        for module in self.modules():
            if isinstance(module, MHCResidual):
                read_directly.update(id(p) for p in module.mapping.phi.parameters())
            elif isinstance(module, MultiHeadLatentAttention):
                read_directly.update(id(p) for p in module.kv_b_proj.parameters())
            elif isinstance(module, MoEFeedForward) and module.router.cfg.router == "switch":
                read_directly.update(id(p) for p in module.router.gate.parameters())
        return [(module, name) for module in self.modules() if isinstance(module, (nn.Linear, GroupedLinear))
                for name, p in module.named_parameters(recurse=False)
                if owners[id(p)] == 1 and id(p) not in read_directly]

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The trainable parameters in three optimizer groups:

        - ``hidden_matrices``: the weights of the blocks' attention and MLP projections (what
          Muon trains under ``optim.name: muon``), with weight decay;
        - the other matrices (embeddings, LM head, the mHC mapping's phi, the MoE router and
          experts, LoRA factors), with weight decay;
        - everything else (norm gains, projection biases, mHC alphas and biases, the stream
          embedding), without.
        """
        hidden, matrices, rest, seen = [], [], [], set()
        for name, module in self.named_modules():
            for key, p in module.named_parameters(recurse=False):
                if id(p) in seen or not p.requires_grad:
                    continue
                seen.add(id(p))
                if not isinstance(module, (nn.Linear, nn.Embedding, GroupedLinear)) or key == "bias":
                    rest.append(p)
                elif isinstance(module, nn.Linear) and key == "weight" and p.ndim == 2 and name.startswith("blocks.") \
                        and ".mapping." not in name and ".router." not in name:
                    hidden.append(p)
                else:
                    matrices.append(p)
        return [
            {"params": hidden, "weight_decay": weight_decay, "hidden_matrices": True},
            {"params": matrices, "weight_decay": weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ]
