"""Mixture-of-experts feed-forward: routers, dropless grouped dispatch, balancing (docs/moe.md).

For a token h the layer computes (Switch Transformer, arXiv 2101.03961; DeepSeekMoE, arXiv 2401.06066)

    MoE(h) = sum_{e in TopK(s + b)} w_e FFN_e(h) + sum_{j < n_shared} FFN_j^shared(h),

s the router's scores, b the balancing bias (zero unless auxiliary-loss-free balancing is on;
it only chooses, it never weights), w the chosen scores renormalised to sum to 1. Every expert
is a SwiGLU of width ``expert_dim``; the shared experts are one SwiGLU of width
``n_shared * expert_dim`` (the same function as n_shared separate ones summed).

Dispatch is dropless: the N k (token, expert) assignments are sorted by expert and each
expert's projections run on its contiguous rows through one grouped matmul per projection
(``torch._grouped_mm`` on bf16 inputs where PyTorch has it: CPU, and CUDA from compute
capability 9.0), else one matmul per expert over its rows. No token is dropped and nothing
loops over tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.model.config import ModelConfig, MoEConfig
from llmkit.model.layers import SwiGLU

HASH_MULTIPLIERS = (2654435761, 2246822519)
"""Knuth's multiplicative-hash constants, one per hash-router slot."""


def expert_counts(experts: torch.Tensor, n_experts: int, real: torch.Tensor | None = None) -> torch.Tensor:
    """How many of the assignments ``experts`` (any shape, expert ids; [N, k] with ``real``) went to
    each expert [E], counting only the tokens where ``real`` [N] is True if given; a scatter-add
    rather than ``bincount``, whose output size depends on the data (torch.compile would break the
    graph there)."""
    flat = experts.reshape(-1)
    ones = torch.ones_like(flat) if real is None else real[:, None].expand_as(experts).reshape(-1).long()
    return torch.zeros(n_experts, device=flat.device, dtype=torch.long).scatter_add_(0, flat, ones)


def expert_utilization(counts: torch.Tensor) -> torch.Tensor:
    """Each expert's share of the assignments (sums to 1 over the last dimension; counts [..., E]
    per expert)."""
    counts = counts.float()
    return counts / counts.sum(-1, keepdim=True).clamp_min(1)


def load_balance_std(counts: torch.Tensor) -> torch.Tensor:
    """The standard deviation of the experts' shares of the assignments (0 for perfectly uniform
    routing)."""
    return expert_utilization(counts).std(-1, unbiased=False)


def max_min_load(counts: torch.Tensor) -> torch.Tensor:
    """The busiest expert's assignments over the idlest's (an idle expert counts as 1), for one
    layer's ``counts`` [n_experts]."""
    return counts.max() / counts.min().clamp_min(1)


def switch_aux_loss(
    probs: torch.Tensor, experts: torch.Tensor, n_experts: int, real: torch.Tensor | None = None
) -> torch.Tensor:
    """The Switch Transformer balancing loss (arXiv 2101.03961, Eq. 4, generalised to top-k):
    E * sum_e f_e P_e, f_e the fraction of the N k assignments routed to expert e and P_e the
    mean router probability of e over the N tokens (probs [N, E], experts [N, k]); with ``real``
    [N], over the tokens where it is True. 1 at uniform routing, E at collapse."""
    if real is None:
        real = torch.ones(probs.size(0), dtype=torch.bool, device=probs.device)
    tokens = real.sum().clamp_min(1).to(probs.dtype)
    fraction = expert_counts(experts, n_experts, real).to(probs.dtype) / (tokens * experts.size(-1))
    return n_experts * torch.sum(fraction * (probs * real[:, None]).sum(0) / tokens)


def router_z_loss(logits: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE's router z-loss (arXiv 2202.08906, Eq. 5): mean over tokens (those where ``real`` [N]
    is True, if given) of logsumexp(logits)^2."""
    z = torch.logsumexp(logits.float(), dim=-1).square()
    return z.mean() if real is None else (z * real).sum() / real.sum().clamp_min(1)


class _AuxLossGradient(torch.autograd.Function):
    """Identity on ``y`` whose backward also sends gradient ``scale`` into ``aux``: the auxiliary
    loss joins the training objective from inside the layer (also under activation checkpointing
    and torch.compile), so every module that trains the backbone optimises CE + aux without
    collecting it (as DeepSeek-V2's reference code does); ``scale`` (:func:`scale_balancing_loss`)
    weighs it as the module weighs its cross-entropy."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, aux: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        ctx.aux_dtype = aux.dtype
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        (scale,) = ctx.saved_tensors
        return grad, scale.to(ctx.aux_dtype), None


class Router(nn.Module):
    """Chooses ``top_k`` experts per token and their weights.

    ``switch``: scores s = softmax(W_r h) or sigmoid(W_r h), in fp32 under autocast too (a bf16
    gate would round the logits the choice is made on); the experts are TopK(s + b), b the
    balancing bias (a buffer: DeepSeek-V3's auxiliary-loss-free balancing, arXiv 2412.19437,
    Sec. 2.1.2, moved by :meth:`update_bias`); weights are the chosen s renormalised to sum 1
    (Mixtral, DeepSeek-V3), except with top_k 1: the score itself (Switch Transformer, arXiv
    2101.03961, Eq. 2), since a single renormalised weight is 1 and would carry no gradient to W_r.
    ``hash``: the experts are fixed by the token id (one multiplicative hash per slot, the second
    moved off the first), each weighted 1/top_k; nothing is learned (Hash Layers, arXiv 2106.04426).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.cfg = config.moe
        if self.cfg.router == "switch":
            self.gate = nn.Linear(config.d_model, self.cfg.n_experts, bias=False)
        self.register_buffer("bias", torch.zeros(self.cfg.n_experts))
        self.register_buffer("routed", torch.zeros(self.cfg.n_experts), persistent=False)
        self.register_buffer("load", torch.zeros(self.cfg.n_experts), persistent=False)
        self.register_buffer("last_load", torch.zeros(self.cfg.n_experts), persistent=False)

    def hash_experts(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The experts [N, top_k] the hash router gives tokens ``token_ids`` [N]: distinct per token."""
        n = self.cfg.n_experts
        first = (token_ids * HASH_MULTIPLIERS[0]) % (2**32) % n
        if self.cfg.top_k == 1:
            return first[:, None]
        offset = 1 + (token_ids * HASH_MULTIPLIERS[1]) % (2**32) % max(n - 1, 1)
        return torch.stack((first, (first + offset) % n), dim=-1)

    def forward(
        self, h: torch.Tensor, token_ids: torch.Tensor | None, real: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weights [N, k] fp32, experts [N, k], balancing loss scalar) for tokens h [N, C]; the
        loss is aux_loss_weight * Switch loss + z_loss_weight * z-loss (0 for the hash router).
        ``real`` [N] (None: all) marks the tokens that are not padding: only they count in the
        balancing losses and in the step's load (what the bias update and the metrics read)."""
        cfg = self.cfg
        if cfg.router == "hash":
            if token_ids is None:
                raise ValueError("the hash router needs the token ids")
            experts = self.hash_experts(token_ids.reshape(-1))
            weights = torch.full(experts.shape, 1.0 / cfg.top_k, device=h.device)
            loss = torch.zeros((), device=h.device)
        else:
            with torch.autocast(h.device.type, enabled=False):
                logits = self.gate(h.to(self.gate.weight.dtype)).float()  # fp32 weights: fp32 logits
            scores = logits.softmax(-1) if cfg.score == "softmax" else logits.sigmoid()
            experts = torch.topk(scores + self.bias, cfg.top_k, dim=-1).indices
            weights = scores.gather(-1, experts)
            if cfg.top_k > 1:
                weights = weights / weights.sum(-1, keepdim=True)
            probs = scores if cfg.score == "softmax" else scores / scores.sum(-1, keepdim=True)
            loss = cfg.aux_loss_weight * switch_aux_loss(probs, experts, cfg.n_experts, real)
            if cfg.z_loss_weight:
                loss = loss + cfg.z_loss_weight * router_z_loss(logits, real)
        if self.training:  # the step's load: not validation's or generation's (eval mode)
            with torch.no_grad():
                self.routed.copy_(expert_counts(experts, cfg.n_experts, real))
        return weights, experts, loss

    @torch.no_grad()
    def add_routed_to_load(self) -> None:
        """Add this forward's assignments (``routed``) to the step's ``load``. The block calls it
        after its forward, outside activation checkpointing, whose recomputation in backward runs
        the router again: it rewrites ``routed`` with the same counts, and adds nothing."""
        self.load += self.routed

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """b_e <- b_e + rate * sign(mean load - load_e): raise underloaded experts, lower
        overloaded ones (DeepSeek-V3's update after each step); ``load`` the assignments per expert."""
        self.bias += self.cfg.bias_update_rate * torch.sign(load.float().mean() - load.float())


def grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs ``x @ weight[e]ᵀ`` here: bf16 operands whose rows are
    multiples of 16 bytes, on a CPU or a CUDA device of compute capability >= 9.0."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        return False
    if weight.size(-1) % 8 or weight.size(-2) % 8:
        return False
    return x.device.type == "cpu" or (x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) >= (9, 0))


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows ``ends[e-1]:ends[e]`` of x [M, in] times weight[e]ᵀ (weight [E, out, in], nn.Linear's
    layout per expert): one grouped matmul where supported, else a matmul per expert."""
    if grouped_mm_supported(x, weight):
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=ends.to(torch.int32))
    return _matmul_per_expert(x, weight, ends)


@torch.compiler.disable  # eager under torch.compile: traced, each new set of row counts would compile anew
def _matmul_per_expert(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """grouped_linear without a grouped kernel: a matmul per expert over its rows (the counts on the host)."""
    sizes = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()
    parts = [rows @ w.t() for rows, w in zip(torch.split(x, sizes), weight, strict=True)]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.size(1))


class GroupedLinear(nn.Module):
    """E bias-free linear maps applied to contiguous row groups: ``weight`` [E, out, in], so that
    LoRA (llmkit.model.lora) can target an expert projection by name as it targets an nn.Linear."""

    def __init__(self, n_experts: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(n_experts, out_features, in_features))

    def forward(self, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        return grouped_linear(x, cast_for_matmul(self.weight, x), ends)


def cast_for_matmul(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``weight`` in the dtype a matmul with x runs in: the autocast dtype under autocast (as
    nn.Linear gets it), else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return weight.to(torch.get_autocast_dtype(x.device.type))
    return weight.to(x.dtype)


class RoutedExperts(nn.Module):
    """n_experts SwiGLU experts, gate/up [E, expert_dim, C] and down [E, C, expert_dim], run on
    the assignments sorted by expert (module docstring)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        e, c, d = config.moe.n_experts, config.d_model, config.moe.expert_dim
        self.n_experts = e
        self.gate_proj = GroupedLinear(e, c, d)
        self.up_proj = GroupedLinear(e, c, d)
        self.down_proj = GroupedLinear(e, d, c)

    def forward(self, h: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """sum_k weights[:, k] FFN_{experts[:, k]}(h) for tokens h [N, C]."""
        n, k = experts.shape
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        ends = torch.cumsum(expert_counts(flat, self.n_experts), 0)
        x = h[order // k]
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        out = self.down_proj(F.silu(self.gate_proj(x, ends)) * self.up_proj(x, ends), ends)
        combined = torch.zeros(n * k, h.size(-1), device=h.device, dtype=out.dtype)
        combined[order] = out
        return (combined.view(n, k, -1) * weights[..., None].to(out.dtype)).sum(1)


class MoEFeedForward(nn.Module):
    """The MoE layer: router, routed experts and (optionally) shared experts; see the module docstring."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.cfg: MoEConfig = config.moe
        self.router = Router(config)
        self.experts = RoutedExperts(config)
        self.shared = SwiGLU(config, config.moe.n_shared * config.moe.expert_dim) if config.moe.n_shared else None
        self.aux_loss = torch.zeros(())
        self.register_buffer("aux_scale", torch.ones(()), persistent=False)  # see scale_balancing_loss

    def forward(
        self, x: torch.Tensor, token_ids: torch.Tensor | None = None, real_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """MoE(x) for x [B, T, C] (``token_ids`` [B, T] for the hash router; ``real_tokens`` [B, T],
        False on padding, which the balancing and the load then leave out). The balancing loss
        joins the objective through the backward pass; its value is kept in ``aux_loss``."""
        h = x.reshape(-1, x.size(-1))
        weights, experts, loss = self.router(h, token_ids, None if real_tokens is None else real_tokens.reshape(-1))
        y = self.experts(h, weights, experts)
        if self.shared is not None:
            y = y + self.shared(h)
        y = y.view(x.shape)
        self.aux_loss = loss.detach()
        if loss.requires_grad:
            y = _AuxLossGradient.apply(y, loss, self.aux_scale)
        return y


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    """The model's MoE layers in depth order."""
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


@torch.no_grad()
def scale_balancing_loss(model: nn.Module, scale: float) -> None:
    """Weigh the balancing loss of the forwards to come by ``scale``, as the caller weighs the
    cross-entropy it back-propagates, so that over a step it counts as ``aux_loss_weight`` and
    ``z_loss_weight`` say against the mean cross-entropy per token: 1 / accumulate_grad_batches for
    a mean loss that Lightning divides by the accumulation, the micro-batch's loss tokens for a sum
    divided by the step's tokens after backward (:class:`~llmkit.optim.TokenMeanAccumulator`), 0
    where the routers are frozen (their balancing loss would only push the layers below)."""
    for layer in moe_layers(model):
        layer.aux_scale.fill_(scale)


@torch.no_grad()
def end_of_step(model: nn.Module, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict[str, float]:
    """After an optimizer step: each MoE layer's load since the last step (summed over ranks by
    ``reduce``, kept in ``router.last_load``), its auxiliary-loss-free bias update when
    ``bias_update_rate`` > 0, and the step's balance metrics (``moe/load_std`` and ``moe/aux_loss``
    averaged over the layers, ``moe/max_min_load`` their worst); the loads are then reset. Nothing
    (an empty dict) before any token was routed."""
    layers = moe_layers(model)
    if not layers or not any(bool(layer.router.load.any()) for layer in layers):
        return {}
    stds, ratios, aux = [], [], []
    for layer in layers:
        load = reduce(layer.router.load.clone()).round()  # counts, exact again where a resumed step's load so far
        # came back as an equal share per rank (LLMKitModule.on_train_start)
        layer.router.last_load.copy_(load)
        if layer.cfg.bias_update_rate and layer.cfg.router == "switch":
            layer.router.update_bias(load)
        stds.append(float(load_balance_std(load)))
        ratios.append(float(max_min_load(load)))
        aux.append(float(layer.aux_loss))
        layer.router.load.zero_()
    return {"moe/load_std": math.fsum(stds) / len(stds), "moe/max_min_load": max(ratios),
            "moe/aux_loss": math.fsum(aux) / len(aux)}
