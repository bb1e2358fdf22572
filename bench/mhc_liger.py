"""llmkit's mHC ops beside liger-kernel's (``liger_kernel.ops.mhc``) at one shape: math, saved state, speed.

    python -m bench.mhc_liger                       # CUDA: n = 4, C = 768, 16k tokens, bf16 stream
    TRITON_INTERPRET=1 python -m bench.mhc_liger    # CPU: sections 1 and 2 at a tiny shape (fp32)

liger-kernel is not an llmkit dependency: ``pip install liger-kernel`` (0.8.5 has the mHC ops), or
unpack its wheel somewhere on PYTHONPATH (bench/gpu_check.sh adds ``.cache/liger`` when it exists).
Both run one mHC residual around an elementwise sublayer (tanh), from the same parameters: those of
an llmkit ``MHCResidual``, its alphas set to each --alphas value, handed to liger's functional API.

1. Math: H_pre, H_post and H_res of both, each against llmkit's ops in fp64 (what tests/test_mhc_ops.py
   checks against the equation-literal oracle), and how far each H_res is from doubly stochastic (its
   largest |row sum - 1| and |column sum - 1|). The alphas set the logits' scale (the table shows the
   largest |H~_res|): 0.01 is llmkit's init; past +-15 llmkit clamps them, liger subtracts the row max.
2. Saved state: bytes autograd keeps per token for one residual (saved-tensor hooks, parameters
   excluded; both keep X and the sublayer's output, counted once).
3. Speed, on CUDA only: forward + backward of one residual, eager, median of --repeats (CUDA events).

On a CPU both run their Triton kernels in the interpreter (TRITON_INTERPRET=1, set before Python starts):
fp32 only there (bf16 ``tl.dot`` is wrong in the interpreter), so sections 1 and 2 only. Prints a table
and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from llmkit.io import write_json_atomic
from llmkit.model import mhc_ops
from llmkit.model.config import ModelConfig
from llmkit.model.mhc import MHCResidual, finish
from llmkit.profiling import device_description, saved_activation_bytes


class LigerResidual(nn.Module):
    """liger-kernel's functional mHC ops on the parameters of an llmkit MHCResidual (φ transposed
    to liger's [nC, 2n + n²] layout and cast to the stream's dtype, as LigerMHC keeps it)."""

    def __init__(self, residual: MHCResidual, dtype: torch.dtype) -> None:
        super().__init__()
        from liger_kernel.transformers import functional

        self.ops = functional
        m = residual.mapping
        self.n, self.cfg, self.norm_eps = m.n, m.cfg, m.norm_eps
        self.phi = nn.Parameter(m.phi.weight.detach().t().contiguous().to(dtype))
        alpha, bias = (t.detach().float() for t in mhc_ops.packed(*m.alpha_and_bias()))
        self.b = nn.Parameter(bias)
        self.alphas = nn.ParameterList(nn.Parameter(a.clone()) for a in alpha)

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.ops.liger_mhc_coeffs(
            x, self.phi, self.b, *self.alphas, allow_fp32=x.dtype == torch.float32, tmax=self.cfg.sinkhorn_iters,
            rms_eps=self.norm_eps, pre_eps=0.0, sinkhorn_eps=self.cfg.sinkhorn_eps, post_mult=2.0)

    def forward(self, x: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        h_pre, h_post, h_res = self.coefficients(x)
        return self.ops.liger_mhc_post_res(x, sublayer(self.ops.liger_mhc_pre(x, h_pre)), h_post, h_res)


def residual_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One residual around tanh, written back: llmkit's leaves its write-back pending (to fuse it
    with the next sublayer's mapping), so :func:`finish` does it here, as after a model's last one."""
    if isinstance(module, LigerResidual):
        return module(x, torch.tanh)
    return finish(module(x, torch.tanh), module.mapping.cfg.use_triton)


def make_residual(args: argparse.Namespace, alpha: float, device: torch.device) -> MHCResidual:
    config = ModelConfig(vocab_size=256, n_layers=1, d_model=args.d_model, n_heads=args.d_model // 64,
                         d_ff=4 * args.d_model, n_streams=args.n_streams)
    residual = MHCResidual(config).to(device)
    torch.manual_seed(0)
    with torch.no_grad():
        residual.mapping.phi.weight.normal_(std=config.init_std)
        for a in (residual.mapping.alpha_pre, residual.mapping.alpha_post, residual.mapping.alpha_res):
            a.fill_(alpha)
    return residual


def doubly_stochastic_error(h_res: torch.Tensor) -> tuple[float, float]:
    """Largest |row sum - 1| and |column sum - 1| of H_res [..., n, n]."""
    return (h_res.sum(-1) - 1).abs().max().item(), (h_res.sum(-2) - 1).abs().max().item()


def largest_residual_logit(mapping: nn.Module, x: torch.Tensor) -> float:
    """max |H~_res| (Eq. 7's alpha_res * (x' phi_res) + b_res) of an fp64 mapping over x [M, n, C]."""
    proj, sumsq = (partials[0] for partials in mhc_ops.project(x.flatten(1), mapping.phi.weight, False))
    alpha, bias = mhc_ops.packed(*mapping.alpha_and_bias())
    logits, _, _ = mhc_ops.mapping_logits(proj, sumsq, alpha, bias, mapping.n, x[0].numel(), mapping.norm_eps)
    return logits[:, 2 * mapping.n:].abs().max().item()


def math_rows(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    rows = []
    for alpha in args.alphas:
        ours = make_residual(args, alpha, device)
        liger = LigerResidual(ours, dtype).to(device)
        x = torch.randn(args.math_tokens, args.n_streams, args.d_model, device=device).to(dtype)
        with torch.no_grad():
            exact_mapping = copy.deepcopy(ours).double().mapping
            exact = exact_mapping(x.double())[2:]  # (H_pre, H_post, H_res) of the Entry
            got = {"llmkit": ours.mapping(x)[2:], "liger-kernel": liger.coefficients(x), "fp64 llmkit": exact}
            logit = largest_residual_logit(exact_mapping, x.double())
        for name, h in got.items():
            errors = {f"{key}_err": (a.double() - e).abs().max().item()
                      for key, a, e in zip(("h_pre", "h_post", "h_res"), h, exact, strict=True)}
            row_err, col_err = doubly_stochastic_error(h[2].double())
            rows.append({"alpha": alpha, "max_logit": logit, "impl": name, **errors,
                         "row_sum_err": row_err, "col_sum_err": col_err})
    return rows


def saved_rows(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    ours = make_residual(args, args.alphas[0], device)
    liger = LigerResidual(ours, dtype).to(device)
    x = torch.randn(args.tokens, args.n_streams, args.d_model, device=device, dtype=dtype, requires_grad=True)
    rows = []
    for name, module in (("llmkit", ours), ("liger-kernel", liger)):
        saved = saved_activation_bytes(module, lambda m=module: residual_forward(m, x))
        rows.append({"impl": name, "saved_bytes_per_token": saved / args.tokens,
                     "stream_bytes_per_token": x[0].numel() * x.element_size()})
    return rows


def time_ms(run: Callable[[], None], repeats: int) -> float:
    """Median ms of ``run()`` over --repeats after three warm-up calls, by CUDA events."""
    for _ in range(3):
        run()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def speed_rows(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    ours = make_residual(args, args.alphas[0], device)
    liger = LigerResidual(ours, dtype).to(device)
    x = torch.randn(args.tokens, args.n_streams, args.d_model, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    rows = []
    for name, module in (("llmkit", ours), ("liger-kernel", liger)):
        forward_ms = time_ms(lambda m=module: residual_forward(m, x), args.repeats)
        step_ms = time_ms(lambda m=module: residual_forward(m, x).backward(grad), args.repeats)
        rows.append({"impl": name, "forward_ms": forward_ms, "forward_backward_ms": step_ms})
    return rows


def print_table(report: dict) -> None:
    a = report["args"]
    print(f"one mHC residual, n = {a['n_streams']}, C = {a['d_model']}, {report['dtype']} stream, "
          f"{report['device']}, torch {report['torch']}")
    print(f"\n1. coefficients against llmkit's fp64 ops ({a['math_tokens']} tokens; max abs error)")
    columns = ("H_pre", "H_post", "H_res", "|row-1|", "|col-1|")
    print(f"{'alpha':>6} {'max|H~|':>7} {'impl':<13} " + " ".join(f"{c:>9}" for c in columns))
    for r in report["math"]:
        print(f"{r['alpha']:>6} {r['max_logit']:>7.2f} {r['impl']:<13} {r['h_pre_err']:>9.2e} {r['h_post_err']:>9.2e} "
              f"{r['h_res_err']:>9.2e} {r['row_sum_err']:>9.2e} {r['col_sum_err']:>9.2e}")
    print(f"\n2. saved for backward ({a['tokens']} tokens; bytes per token, one residual)")
    for r in report["saved"]:
        print(f"{r['impl']:<13} {r['saved_bytes_per_token']:>8.0f} B  (the stream X alone: "
              f"{r['stream_bytes_per_token']} B)")
    if report["speed"]:
        print(f"\n3. speed ({a['tokens']} tokens, eager, median of {a['repeats']})")
        for r in report["speed"]:
            print(f"{r['impl']:<13} forward {r['forward_ms']:.3f} ms, "
                  f"forward + backward {r['forward_backward_ms']:.3f} ms")
    else:
        print("\n3. speed: CUDA only (not run)")


def main(argv: list[str] | None = None) -> dict:
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    cuda = torch.cuda.is_available() and not interpreted
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-streams", type=int, default=4)
    p.add_argument("--d-model", type=int, default=768 if cuda else 64)
    p.add_argument("--tokens", type=int, default=16384 if cuda else 64, help="sections 2 and 3")
    p.add_argument("--math-tokens", type=int, default=4096 if cuda else 64, help="section 1")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.01, 1.0, 10.0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=str(Path(os.environ.get("OUT", "lightning_logs/bench")) / "mhc_liger.json"))
    args = p.parse_args(argv)
    if not cuda and not interpreted:
        p.error("no CUDA device: on a CPU set TRITON_INTERPRET=1 before starting Python (both run Triton kernels)")
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    report = {"args": vars(args), "device": device_description(), "torch": torch.__version__,
              "dtype": str(dtype).removeprefix("torch."),
              "math": math_rows(args, device, dtype), "saved": saved_rows(args, device, dtype),
              "speed": speed_rows(args, device, dtype) if cuda else []}
    print_table(report)
    write_json_atomic(Path(args.out), report)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
