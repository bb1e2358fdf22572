"""Every module under DDP with two CPU processes (gloo), against a single process over the union
of the two ranks' batches; and the pieces that make that hold (docs/scaling_out.md).

Each multi-process run records, per rank (tests/distributed_helpers.py), its batches as the
data module handed them, what it sampled, the files it wrote, DDP's gradient all-reduces, the
gradients of its first optimizer step and its final state. A test then checks that the ranks saw
distinct data and ended bit-identical, that only rank 0 wrote files, and that a single process
fed the union of the two ranks' batches (rank 0's rows first) applies the same first gradients
(GRADIENT_TOLERANCE: the check that catches a wrong normalisation, which AdamW's scale-free
update would hide in the weights) and ends at the same weights (WEIGHT_TOLERANCE: the two runs
add the same numbers in different orders, and AdamW turns rounding in near-zero gradient entries
into visible, still tiny, differences). Where a module samples inside its step (SDFT,
TTT-Discover), the single process is handed the samples the two ranks drew (``ReplaySamples``):
random draws are per rank by design (``RankSeeds``), so what is compared is everything after
sampling.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from llmkit.callbacks import AtomicCheckpointIO, Checkpoint, EMATeacher, RegressionGate, Replay
from llmkit.cli import main
from llmkit.data.datamodule import PackedDataModule
from llmkit.data.examples import Example
from llmkit.data.sdft_data import SDFTDataModule
from llmkit.data.tasks import write_task_files
from llmkit.discovery.objective import kl_shaped_advantages
from llmkit.distributed import MAX_RANKS, PAD_INDEX, EvalSampler, RankSeeds, gather_objects, rank_share
from llmkit.errors import LLMKitError
from llmkit.eval.report import EvalConfig
from llmkit.model.checkpoint import is_sharded_checkpoint, load_backbone
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer
from llmkit.modules.pretrain import PretrainModule
from llmkit.modules.sdft import SDFTModule
from llmkit.modules.sft import SFTModule
from llmkit.modules.ttt_discover import TTTDiscoverModule
from llmkit.optim import OptimConfig, TokenMeanAccumulator
from tests.conftest import VOCAB_SIZE
from tests.distributed_helpers import FirstGrads, RankLog, ReplaySamples, SaveInTheFirstWindow, SkewedGate

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ModelConfig(vocab_size=VOCAB_SIZE, n_layers=1, d_model=32, n_heads=4, d_ff=64, max_seq_len=512, n_streams=2)
GRADIENT_TOLERANCE = 1e-4
"""Largest relative difference (in norm, per tensor) between the first step's gradients of the
two-process run and of the single process (measured: at most 4e-6; a normalisation off by a
factor k would show as |1 - k|)."""
WEIGHT_TOLERANCE = 0.05
"""Largest weight difference between the two runs after their last step, as a fraction of the
learning rate (measured: at most 0.6%, in SDFT's LM head; see the module docstring)."""


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("distributed_base") / "base.ckpt"
    state = {f"model.{k}": v for k, v in Transformer(CONFIG).state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"config": CONFIG.to_dict()}}, path)
    return path


def run(callbacks: list, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, plugins=[AtomicCheckpointIO()], callbacks=callbacks, **kwargs)


def two_ranks(out: Path) -> list[dict]:
    """What each rank recorded (RankLog), checked to be two ranks that ended bit-identical."""
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    zero, one = (r["state_dict"] for r in ranks)
    assert zero.keys() == one.keys()
    assert all(torch.equal(zero[k], one[k]) for k in zero), "the ranks' weights differ"
    assert ranks[1]["writes"] == [], "rank 1 wrote files"
    return ranks


def assert_same_run(rank: dict, grads: dict, state: dict, lr: float) -> None:
    """The first step's gradients as in ``grads`` (the single process's), the final weights as in
    ``state`` within WEIGHT_TOLERANCE x ``lr``."""
    assert rank["first_grads"].keys() == grads.keys() and grads
    for name, grad in grads.items():
        assert (rank["first_grads"][name] - grad).norm() <= GRADIENT_TOLERANCE * grad.norm() + 1e-12, name
    assert rank["state_dict"].keys() == state.keys()
    for name, value in state.items():
        assert torch.allclose(rank["state_dict"][name], value, rtol=0, atol=WEIGHT_TOLERANCE * lr), name


def union(ranks: list[dict]) -> list:
    """The single-process batches: micro-batch k is rank 0's k-th and rank 1's k-th together."""
    batches = []
    for zero, one in zip(ranks[0]["batches"], ranks[1]["batches"], strict=True):
        if isinstance(zero[0], torch.Tensor):
            batches.append([torch.cat([a, b]) for a, b in zip(zero, one, strict=True)])
        else:
            batches.append([Example(**e) for e in zero + one])
    return batches


def loader(batches: list) -> DataLoader:
    return DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch)


def union_samples(ranks: list[dict]) -> list:
    return [(c0 + c1, s0 + s1) for (c0, s0), (c1, s1) in zip(ranks[0]["samples"], ranks[1]["samples"], strict=True)]


def test_rank_share_splits_in_order_and_a_single_process_gathers_itself():
    shares = [rank_share(7, r, 3) for r in range(3)]
    assert [list(s) for s in shares] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [len(rank_share(2, r, 4)) for r in range(4)] == [1, 1, 0, 0]
    one = SimpleNamespace(world_size=1, strategy=SimpleNamespace(broadcast=lambda obj, src: obj))
    assert gather_objects(one, {"a": 1}) == [{"a": 1}]
    torch.manual_seed(5)
    rank_0 = RankSeeds()
    torch.manual_seed(5)
    rank_1 = RankSeeds()  # built after the same seed_everything: the same base
    torch.randint(0, 10, (3,))  # the global generator moves on (a data loader's draw): the seeds do not
    first = [rank_0.next(0) for _ in range(3)]
    assert [rank_1.next(1) for _ in range(3)] == [s + 1 for s in first]  # a stream of its own per rank
    assert len(set(first)) == 3 and first[1] - first[0] == MAX_RANKS
    resumed = RankSeeds()
    resumed.load_state_dict({"base": rank_0.base, "draws": 1})  # a checkpoint taken after one draw
    assert [resumed.next(0) for _ in range(2)] == first[1:]


def test_kl_centering_over_a_split_batch_is_the_centering_of_the_whole():
    torch.manual_seed(0)
    logp, base = torch.randn(6, 5), torch.randn(6, 5)
    mask = torch.rand(6, 5) > 0.3
    advantages = torch.randn(6)
    whole = kl_shaped_advantages(advantages, logp, base, mask, 0.1, center=True)
    halves = [slice(0, 4), slice(4, 6)]  # two "ranks" holding 4 and 2 rollouts
    totals = sum(torch.stack([torch.where(mask[h], logp[h].double() - base[h].double(), 0.0).sum(),
                              mask[h].sum().double()]) for h in halves)
    parts = [kl_shaped_advantages(advantages[h], logp[h], base[h], mask[h], 0.1, True, lambda t: totals)
             for h in halves]
    assert torch.allclose(torch.cat(parts), whole, atol=1e-12)
    alone = kl_shaped_advantages(advantages[:4], logp[:4], base[:4], mask[:4], 0.1, center=True)
    assert not torch.allclose(parts[0], alone)  # a rank-local mean would shape differently


def test_the_all_reduced_token_count_lives_on_the_module_device():
    """NCCL reduces device tensors only: the count and the loss sum are created on ``module.device``
    (here the meta device, which no CPU default could hide), and the reduced count scales the
    gradients (two ranks: 3 tokens here, 5 on the other)."""
    reduced: list[torch.Tensor] = []

    def reduce(tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
        reduced.append(tensor)
        return torch.tensor(8 if tensor.dtype == torch.int64 else 12.0)  # this rank's and the other's sums

    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    module = SimpleNamespace(
        device=torch.device("meta"), global_step=0, parameters=lambda: [weight],
        manual_backward=lambda loss: loss.backward(), optimizers=lambda: optimizer,
        lr_schedulers=lambda: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        trainer=SimpleNamespace(world_size=2, strategy=SimpleNamespace(reduce=reduce), precision="32-true"),
    )
    stats = TokenMeanAccumulator(module).backward((weight * 3).sum(), 3)
    assert [(t.device.type, t.dtype) for t in reduced] == [("meta", torch.int64), ("meta", torch.float32)]
    assert stats.tokens == 8 and stats.loss == 12.0 / 8
    assert torch.allclose(weight.detach(), torch.full((2,), 1 - 3 * 2 / 8))  # gradient 3, x world size / tokens


def test_eval_sampler_puts_each_item_on_one_rank_and_pads_the_shorter_shares():
    shares = [list(EvalSampler(range(9), num_replicas=3, rank=r)) for r in range(3)] + \
        [list(EvalSampler(range(7), num_replicas=3, rank=r)) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4, 7], [2, 5, 8], [0, 3, 6], [1, 4, PAD_INDEX], [2, 5, PAD_INDEX]]


@pytest.mark.slow
def test_validation_under_ddp_scores_each_window_once(base_ckpt, shards):
    """9 windows on 2 ranks: Lightning's sampler scores window 0 twice (val/loss 5.9766 for 5.9722
    in one process, measured); EvalSampler pads rank 1 with a window whose targets count nothing,
    and both ranks run 3 batches."""
    def val_loss(**kwargs) -> float:
        data = PackedDataModule(train_files=[str(shards["train"])], val_files=[str(shards["val"])], seq_len=16,
                                batch_size=2, vocab_size=VOCAB_SIZE, val_windows=9)
        module = PretrainModule(CONFIG, OptimConfig(), init_ckpt=str(base_ckpt))
        return run([], **kwargs).validate(module, data, verbose=False)[0]["val/loss"]

    one, two = val_loss(devices=1), val_loss(strategy="ddp_spawn", devices=2)
    assert two == pytest.approx(one, rel=1e-6, abs=0)


def test_fine_tuning_validation_under_ddp_scores_each_example_once(base_ckpt, tokenizer_path, tmp_path):
    """3 validation examples on 2 ranks, batches of 2: Lightning's sampler gave rank 1 example 0
    again (SFT val/loss 5.9569 for 5.9559 in one process, measured); EvalSampler pads rank 1's
    batch, and SFT's val/loss equals one process's. SDFT with batches of 1 gives rank 1 a last
    batch of padding only, which it skips; its statistics count 3 completions."""
    val = tmp_path / "val.jsonl"
    write_task_files("arithmetic", 3, seed=4, out=val)
    module_args = {"init_ckpt": str(base_ckpt), "tokenizer": str(tokenizer_path)}

    def validate(module: L.LightningModule, batch_size: int, **kwargs) -> dict:
        data = SDFTDataModule(train_files=[str(val)], val_files=[str(val)], batch_size=batch_size)
        return run([], **kwargs).validate(module, data, verbose=False)[0]

    one, two = (validate(SFTModule(**module_args), 2, devices=1),
                validate(SFTModule(**module_args), 2, strategy="ddp_spawn", devices=2))
    assert two["val/loss"] == pytest.approx(one["val/loss"], rel=1e-6, abs=0)

    sdft = validate(SDFTModule(**module_args, sdft={"max_new_tokens": 4}), 1, strategy="ddp_spawn", devices=2)
    assert 1 <= sdft["val/gen_len_min"] <= sdft["val/gen_len_mean"] <= sdft["val/gen_len_max"] <= 4
    assert sdft["val/eos_fraction"] * 3 == pytest.approx(round(sdft["val/eos_fraction"] * 3))  # of 3 completions


def test_fewer_validation_examples_than_processes_is_a_clear_error(tmp_path):
    val = tmp_path / "val.jsonl"
    write_task_files("arithmetic", 3, seed=4, out=val)
    data = SDFTDataModule(val_files=[str(val)], batch_size=2)
    data.setup("validate")
    data.trainer = SimpleNamespace(world_size=4, global_rank=0)
    with pytest.raises(LLMKitError, match=r"data.val_files hold 3 examples, fewer than the 4 processes validating "
                                          r"them: give at least 4"):
        data.val_dataloader()


@pytest.mark.slow
def test_pretraining_under_ddp_equals_one_process_over_both_ranks_batches(base_ckpt, shards, tokenizer_path, tmp_path,
                                                                          capsys):
    """Automatic optimisation, accumulation 2 and clipping: distinct windows per rank, one
    all-reduce per optimizer step, bit-identical ranks, the single process's weights, the
    checkpoint written by rank 0; and a checkpoint sharded over the two ranks the way FSDP writes
    one (torch.distributed.checkpoint, each rank its half of every tensor, meta.pt) that
    ``load_backbone``, ``validate --ckpt_path`` and ``generate`` read in one process."""
    out = tmp_path / "ddp"
    optim = OptimConfig(lr=1e-3, warmup_steps=1)
    data = PackedDataModule(train_files=[str(shards["train"])], seq_len=16, batch_size=2, vocab_size=VOCAB_SIZE,
                            samples_per_epoch=16)
    common = {"max_steps": 2, "accumulate_grad_batches": 2, "gradient_clip_val": 0.5}
    L.seed_everything(0, verbose=False)
    module = PretrainModule(CONFIG, optim, init_ckpt=str(base_ckpt))
    run([RankLog(str(out)), ShardedCopy(str(out / "sharded.ckpt")), Checkpoint(dirpath=out / "ckpt", save_top_k=0)],
        strategy="ddp_spawn", devices=2, **common).fit(module, data)
    ranks = two_ranks(out)
    handed_back = module.state_dict()  # ddp_spawn loads rank 0's weights into this process's module, built for them
    assert all(torch.equal(handed_back[k], v) for k, v in ranks[0]["state_dict"].items())

    windows = [{tuple(row.tolist()) for batch in r["batches"] for row in batch[0]} for r in ranks]
    assert len(windows[0]) == len(windows[1]) == 8 and not windows[0] & windows[1]  # distinct data
    assert [r["allreduces"] for r in ranks] == [2, 2]  # one per optimizer step, not one per micro-batch
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["last.ckpt"]
    assert all(Path(w).name == "last.ckpt" for w in ranks[0]["writes"])

    reference = PretrainModule(CONFIG, optim, init_ckpt=str(base_ckpt))
    grads = FirstGrads()
    run([grads], **common, enable_checkpointing=False).fit(reference, loader(union(ranks)))
    assert_same_run(ranks[0], grads.grads, reference.state_dict(), optim.lr)
    assert ranks[0]["tokens_seen"] == ranks[1]["tokens_seen"] == reference.tokens_seen == 2 * 2 * 4 * 16

    sharded = out / "sharded.ckpt"
    assert is_sharded_checkpoint(sharded) and len(list(sharded.glob("*.distcp"))) == 2
    backbone = load_backbone(sharded)
    full = {k.removeprefix("model."): v for k, v in ranks[0]["state_dict"].items()}
    assert all(torch.equal(v, full[k]) for k, v in backbone.state_dict().items())
    losses = []
    for ckpt in (out / "ckpt" / "last.ckpt", sharded):
        assert main(["pretrain", "validate", "--ckpt_path", str(ckpt), "--trainer.accelerator", "cpu",
                     "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                     "--trainer.default_root_dir", str(tmp_path / "val"), "--data.train_files", str(shards["train"]),
                     "--data.val_files", str(shards["val"]), "--data.seq_len", "16", "--data.val_windows", "4"]) == 0
        losses.append(next(line.split()[-2] for line in capsys.readouterr().out.splitlines() if "val/loss" in line))
    assert losses[0] == losses[1]
    assert main(["generate", "--ckpt", str(sharded), "--tokenizer", str(tokenizer_path),
                 "--prompt", "def ", "--max-new-tokens", "3"]) == 0
    next(sharded.glob("*.distcp")).unlink()
    with pytest.raises(LLMKitError, match="shard file is missing or damaged"):
        load_backbone(sharded)


class ShardedCopy(L.Callback):
    """At the end of training, writes the checkpoint the way Lightning's FSDPStrategy does with
    ``state_dict_type: sharded``: the weights as tensors sharded over the ranks (DTensors, row
    blocks; scalars replicated) through torch.distributed.checkpoint, everything else in meta.pt."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (trainer.world_size,))
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=True)
        state = {k: distribute_tensor(v, mesh, [Shard(0) if v.dim() else Replicate()])
                 for k, v in checkpoint.pop("state_dict").items()}
        dcp.save({"model": state}, checkpoint_id=self.path)
        if trainer.is_global_zero:
            torch.save(checkpoint, Path(self.path) / "meta.pt")


def sft_examples(tmp_path: Path) -> tuple[Path, Path]:
    """16 training examples (8 per rank: 4 batches of 2) and 4 earlier ones for the replay buffer."""
    train, old = tmp_path / "train.jsonl", tmp_path / "old.jsonl"
    write_task_files("arithmetic", 16, seed=0, out=train)
    write_task_files("arithmetic", 4, seed=1, out=old)
    return train, old


@pytest.mark.slow
def test_sft_under_ddp_with_replay_and_a_gate_equals_one_process(base_ckpt, tokenizer_path, shards, tmp_path):
    """Manual optimisation with accumulation 2 (``no_sync`` on the first micro-batch: one all-reduce
    per step), Replay over the global batch and a RegressionGate whose rank-1 evaluations are
    skewed (SkewedGate): both ranks still take rank 0's decisions, hold the same replay state and
    end bit-identical, and all of it equals one process with batch 4 over the union of the
    batches, the gate and Replay included. Only rank 0 writes the gate's files."""
    train, old = sft_examples(tmp_path)
    module_args = {"init_ckpt": str(base_ckpt), "tokenizer": str(tokenizer_path), "accumulate_grad_batches": 2,
                   "gradient_clip_val": None, "optim": {"lr": 1e-3, "warmup_steps": 1}}
    evaluation = EvalConfig(ppl_files=[str(shards["val"])], seq_len=16, max_windows=4)

    def callbacks(gate: type[RegressionGate], out: Path) -> list:
        return [Replay(buffer_size=8, replay_ratio=0.5, seed=3, seed_files=[str(old)]),
                gate(every_n_steps=1, evaluation=evaluation, out_dir=str(out / "gates"))]

    out = tmp_path / "ddp"
    L.seed_everything(0, verbose=False)
    data = SDFTDataModule(train_files=[str(train)], batch_size=2)
    run([RankLog(str(out)), *callbacks(SkewedGate, out)], strategy="ddp_spawn", devices=2, max_steps=2,
        enable_checkpointing=False).fit(SFTModule(**module_args), data)
    ranks = two_ranks(out)
    prompts = [{e["prompt"] for batch in r["batches"] for e in batch} for r in ranks]
    assert len(prompts[0]) == len(prompts[1]) == 8 and not prompts[0] & prompts[1]
    assert [r["allreduces"] for r in ranks] == [2, 2]  # 4 micro-batches, 2 optimizer steps
    assert ranks[0]["replay"]["rng_state"] == ranks[1]["replay"]["rng_state"]
    assert ranks[0]["replay"]["buffer"] == ranks[1]["replay"]["buffer"]
    assert torch.equal(ranks[0]["replay"]["seen_keys"], ranks[1]["replay"]["seen_keys"])
    assert ranks[0]["decisions"] == ranks[1]["decisions"] and len(ranks[0]["decisions"]) == 2
    written = sorted(str(Path(w).relative_to(out)) for w in ranks[0]["writes"])
    assert written == sorted(f"gates/block_{b:04d}/{f}.json" for b in (1, 2)
                             for f in ("eval_before", "eval_after", "gate_decision"))

    reference = SFTModule(**module_args)
    grads, (replay, gate) = FirstGrads(), callbacks(RegressionGate, tmp_path / "one")
    run([grads, replay, gate], max_steps=2, enable_checkpointing=False).fit(reference, loader(union(ranks)))
    assert_same_run(ranks[0], grads.grads, reference.state_dict(), 1e-3)
    assert replay.state_dict()["buffer"] == ranks[0]["replay"]["buffer"]
    assert replay.state_dict()["rng_state"] == ranks[0]["replay"]["rng_state"]
    assert [d["decision"] for d in gate.decisions] == [d["decision"] for d in ranks[0]["decisions"]]
    assert [d["ppl_after"] for d in gate.decisions] == pytest.approx([d["ppl_after"] for d in ranks[0]["decisions"]])


@pytest.mark.slow
def test_a_ddp_checkpoint_saved_inside_a_step_resumes_it_with_every_ranks_gradients(base_ckpt, tokenizer_path,
                                                                                      tmp_path):
    """A checkpoint saved between the micro-batches of a step holds the mean of the ranks' gradients so far
    and the sum of their token and loss sums, which the step's all-reduce completes: resumed from it, the two
    ranks end where the run that saved it did."""
    train, _ = sft_examples(tmp_path)
    module_args = {"init_ckpt": str(base_ckpt), "tokenizer": str(tokenizer_path), "accumulate_grad_batches": 2,
                   "gradient_clip_val": None, "optim": {"lr": 1e-3, "warmup_steps": 1}}
    out, resumed = tmp_path / "ddp", tmp_path / "resumed"
    data = SDFTDataModule(train_files=[str(train)], batch_size=2)
    run([RankLog(str(out)), SaveInTheFirstWindow(str(out))], strategy="ddp_spawn", devices=2, max_steps=2,
        enable_checkpointing=False).fit(SFTModule(**module_args), data)
    window = torch.load(out / "window.ckpt", weights_only=True)["llmkit_accumulation_window"]
    ranks = [torch.load(out / f"window{r}.pt", weights_only=True) for r in (0, 1)]
    assert window["gradients"].keys() == ranks[0]["gradients"].keys() and window["gradients"]
    for name, grad in window["gradients"].items():
        torch.testing.assert_close(grad, (ranks[0]["gradients"][name] + ranks[1]["gradients"][name]) / 2)
    assert window["accumulator"]["micro_batches"] == 1
    assert window["accumulator"]["tokens"] == ranks[0]["tokens"] + ranks[1]["tokens"]
    assert window["accumulator"]["loss_sum"] == pytest.approx(ranks[0]["loss_sum"] + ranks[1]["loss_sum"])

    run([RankLog(str(resumed))], strategy="ddp_spawn", devices=2, max_steps=2, enable_checkpointing=False).fit(
        SFTModule(**module_args), data, ckpt_path=out / "window.ckpt")
    straight, after = two_ranks(out)[0]["state_dict"], two_ranks(resumed)[0]["state_dict"]
    for name, value in straight.items():
        assert torch.allclose(after[name], value, rtol=0, atol=WEIGHT_TOLERANCE * 1e-3), name


@pytest.mark.slow
def test_sdft_under_ddp_keeps_teacher_and_replay_identical_and_equals_one_process(base_ckpt, tokenizer_path, tmp_path):
    """Each rank samples its own batch's completions with a seed of its own; the EMA teacher and
    the replay buffer stay bit-identical on both ranks; one process with batch 2, handed the two
    ranks' samples, reaches the same student and teacher."""
    train, old = tmp_path / "train.jsonl", tmp_path / "old.jsonl"
    write_task_files("arithmetic", 4, seed=2, out=train)
    write_task_files("arithmetic", 4, seed=1, out=old)
    module_args = {"init_ckpt": str(base_ckpt), "tokenizer": str(tokenizer_path), "sdft": {"max_new_tokens": 4},
                   "optim": {"lr": 1e-3, "warmup_steps": 1}}

    def callbacks() -> list:
        return [Replay(buffer_size=8, replay_ratio=0.5, seed=3, seed_files=[str(old)]), EMATeacher(decay=0.5)]

    out = tmp_path / "ddp"
    L.seed_everything(0, verbose=False)
    data = SDFTDataModule(train_files=[str(train)], batch_size=1)
    run([RankLog(str(out)), *callbacks()], strategy="ddp_spawn", devices=2, max_steps=2,
        enable_checkpointing=False).fit(SDFTModule(**module_args), data)
    ranks = two_ranks(out)
    assert [len(r["samples"]) for r in ranks] == [2, 2] and ranks[0]["samples"] != ranks[1]["samples"]
    assert ranks[0]["replay"]["buffer"] == ranks[1]["replay"]["buffer"]
    teacher = {k: v for k, v in ranks[0]["state_dict"].items() if k.startswith("teacher.")}
    base = torch.load(base_ckpt, weights_only=True)["state_dict"]
    assert any(not torch.equal(v, base[k.replace("teacher.", "model.", 1)]) for k, v in teacher.items())  # it moved

    reference = SDFTModule(**module_args)
    grads = FirstGrads()
    run([grads, ReplaySamples(union_samples(ranks)), *callbacks()], max_steps=2,
        enable_checkpointing=False).fit(reference, loader(union(ranks)))
    assert_same_run(ranks[0], grads.grads, reference.state_dict(), 1e-3)


@pytest.mark.slow
def test_ttt_discover_under_the_cli_ddp_launcher_splits_rollouts_and_writes_once(base_ckpt, tokenizer_path, tmp_path):
    """``llmkit ttt fit --trainer.strategy ddp --trainer.devices 2`` (Lightning's launcher starts
    the second process): each rank samples 3 of the step's 6 rollouts, both ranks hold the same
    archive and adapter, rank 0 alone writes discovery_log.jsonl, the adapters, archive.json and
    result.json; one process handed the six rollouts of each step reaches the same archive and
    LoRA weights (KL centring over both ranks' tokens included). Without model.out_dir, where rank 0
    alone used to ask the trainer for its log directory, a collective, and the run hung up."""
    ttt = {"env": "tests.lenient_env.PrintableGuessEnv", "env_args": {"target": "alpha", "metric": "edit"},
           "starts_per_step": 2, "group_size": 3, "max_new_tokens": 8, "adapter_every": 1, "kl_center": True}
    model = {"init_ckpt": str(base_ckpt), "tokenizer": str(tokenizer_path), "ttt": ttt,
             "lora": {"rank": 2, "alpha": 4.0}, "optim": {"lr": 1e-2, "warmup_steps": 1}, "gradient_clip_val": None}
    out = tmp_path / "ddp"
    config = {"seed_everything": 0,
              "trainer": {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "max_steps": 2, "logger": False,
                          "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                          "default_root_dir": str(out / "run"),  # no model.out_dir: the run's directory
                          "callbacks": [{"class_path": "tests.distributed_helpers.RankLog",
                                         "init_args": {"out": str(out)}}]},
              "model": model}
    (tmp_path / "ttt.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "llmkit", "ttt", "fit", "--config", str(tmp_path / "ttt.yaml")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = two_ranks(out)
    assert [[len(actions) for _, actions in r["samples"]] for r in ranks] == [[3, 3], [3, 3]]
    assert ranks[0]["archive"] == ranks[1]["archive"] and ranks[0]["archive"]["total_rollouts"] == 12
    assert len(ranks[0]["archive"]["states"]) > 1 and any(g.norm() > 0 for g in ranks[0]["first_grads"].values())
    run_dir = out / "run"
    log = [json.loads(line) for line in (run_dir / "discovery_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    written = [str(Path(w).relative_to(run_dir)) for w in ranks[0]["writes"]]
    assert sorted(written) == ["adapters/step_000001.safetensors", "adapters/step_000002.safetensors",
                               *["archive.json"] * 4, *["result.json"] * 4]  # at the start, each step, the end
    assert json.loads((run_dir / "result.json").read_text())["rollouts"] == 12

    L.seed_everything(0, verbose=False)
    reference = TTTDiscoverModule(**model, out_dir=str(tmp_path / "one"))
    grads = FirstGrads()
    run([grads, ReplaySamples(union_samples(ranks))], max_steps=2, enable_checkpointing=False).fit(reference)
    assert reference.archive.to_dict() == ranks[0]["archive"]
    assert_same_run(ranks[0], grads.grads, reference.state_dict(), 1e-2)


@pytest.mark.slow
def test_a_ddp_moe_run_resumed_between_micro_batches_counts_the_steps_expert_load_once(shards, tmp_path):
    """The load so far went to rank 0 alone, and DDP's first forward after the resume copies rank 0's buffers
    to every rank: the step's load summed it twice, and moe/load_std (and the bias update) moved off the
    uninterrupted run's. Two `pretrain fit` processes of DDP each (its launcher starts the second rank)."""
    from tests.test_checkpoints import losses, write_tensorboard_config

    flags = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.log_every_n_steps", "1",
             "--trainer.val_check_interval", "2", "--trainer.check_val_every_n_epoch", "null",
             "--trainer.accumulate_grad_batches", "2", "--model.config.moe.n_experts", "4",
             "--model.config.moe.bias_update_rate", "0.01"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def fit(root: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "llmkit", "pretrain", "fit", "--config", str(root / "tb.yaml"),
                               *flags, *extra], cwd=root, env=env, capture_output=True, text=True, timeout=600)

    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    for root in (straight, interrupted):
        root.mkdir()
        config = yaml.safe_load(write_tensorboard_config(root, shards, 6).read_text())
        config["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 100  # only the interrupt saves
        (root / "tb.yaml").write_text(yaml.safe_dump(config))
    assert fit(straight).returncode == 0
    assert fit(interrupted, "--trainer.callbacks+=tests.test_checkpoints.CtrlCBetweenMicroBatches").returncode == 1
    last = interrupted / "tb" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    assert len(torch.load(last, weights_only=True)["llmkit_accumulation_window"]["moe_load"]) == 2
    assert fit(interrupted, "--ckpt_path", str(last)).returncode == 0
    assert losses(interrupted, "moe/load_std") == losses(straight, "moe/load_std")
    assert [s for s, _ in losses(interrupted, "train/loss")] == [s for s, _ in losses(straight, "train/loss")]
