"""RegressionGate: every block of optimizer steps is evaluated; a regressing block is reverted."""

import copy
import csv
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from llmkit.callbacks import RegressionGate
from llmkit.callbacks.regression_gate import gate_decision
from llmkit.data.datamodule import PackedDataModule
from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import LLMKitError
from llmkit.eval import EvalConfig, Probe, score_probes
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer
from tests.conftest import VOCAB_SIZE

PROMPT = "def alpha_0(beta, alpha=None):\n"
FILES = ("eval_before.json", "eval_after.json", "gate_decision.json")


class Student(L.LightningModule):
    """The gate's contract: ``model`` (evaluated), a frozen ``teacher``, ``tokenizer``, ``evaluation``."""

    def __init__(self, tokenizer_path: Path | None, evaluation: EvalConfig | None, lr: float = 1e-3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = Transformer(ModelConfig(vocab_size=VOCAB_SIZE, n_layers=1, d_model=32, n_heads=4, d_ff=64,
                                             max_seq_len=64, n_streams=2))
        self.teacher = copy.deepcopy(self.model).requires_grad_(False)
        self.tokenizer = None if tokenizer_path is None else Tokenizer(tokenizer_path)
        self.evaluation = evaluation
        self.lr = lr

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model.loss(*batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr)


class Recorder(L.Callback):
    """Copies module and optimizer state after every optimizer step, before the gate (listed after it) acts."""

    def __init__(self) -> None:
        self.states: dict[int, tuple[dict, dict]] = {}

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.states[trainer.global_step] = copy.deepcopy((module.state_dict(), trainer.optimizers[0].state_dict()))


class Corrupt(L.Callback):
    """A synthetic regression: large noise on every weight, student and teacher, before step ``at_step``."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, module, *args) -> None:
        if trainer.global_step == self.at_step:
            with torch.no_grad():
                for p in module.parameters():
                    p.add_(torch.randn_like(p) * 2.0)


def same(a, b) -> bool:
    """Exact equality of nested state dicts (tensors by torch.equal)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def val_config(shards) -> EvalConfig:
    return EvalConfig(ppl_files=[str(shards["val"])], seq_len=32, max_windows=4)


def fit(tmp_path, module: Student, shards, max_steps: int, callbacks: list, ckpt_path: Path | None = None,
        samples_per_epoch: int | None = None, **kw) -> L.Trainer:
    args = dict(max_steps=max_steps, accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = L.Trainer(callbacks=callbacks, **{**args, **kw})
    data = PackedDataModule(train_files=[str(shards["train"])], seq_len=32, batch_size=4, vocab_size=VOCAB_SIZE,
                            samples_per_epoch=samples_per_epoch)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def read_block(root: Path, block: int) -> dict[str, dict]:
    folder = root / f"block_{block:04d}"
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)  # no temp files left
    return {name.removesuffix(".json"): json.loads((folder / name).read_text()) for name in FILES}


def test_a_regressing_block_is_rejected_and_weights_and_optimizer_restored(tmp_path, shards, tokenizer_path,
                                                                          caplog):
    module = Student(tokenizer_path, val_config(shards))
    recorder, gate = Recorder(), RegressionGate(every_n_steps=2, out_dir=str(tmp_path / "gates"))
    with caplog.at_level("INFO"):
        trainer = fit(tmp_path, module, shards, 4, [Corrupt(at_step=3), recorder, gate])
    lines = [line for line in caplog.text.splitlines() if "gate block" in line]
    assert len(lines) == 2 and "gate block 1 (steps 0-2): ppl" in lines[0] and lines[0].endswith(": accepted")
    assert "gate block 2 (steps 2-4): ppl" in lines[1] and ": rejected (perplexity rose by" in lines[1]
    assert lines[1].endswith("the weights of step 2 are restored")

    assert [d["decision"] for d in gate.decisions] == ["accepted", "rejected"] and gate.rejections == 1
    end_of_block_1, corrupted = recorder.states[2], recorder.states[4]
    assert not same(corrupted[0]["model.tok_emb.weight"], end_of_block_1[0]["model.tok_emb.weight"])
    assert not same(corrupted[0]["teacher.tok_emb.weight"], end_of_block_1[0]["teacher.tok_emb.weight"])
    assert not same(corrupted[1], end_of_block_1[1])  # the block moved AdamW's moments and step
    assert same(module.state_dict(), end_of_block_1[0])  # student and teacher, exactly
    assert same(trainer.optimizers[0].state_dict(), end_of_block_1[1])

    first, second = read_block(tmp_path / "gates", 1), read_block(tmp_path / "gates", 2)
    assert first["gate_decision"] == gate.decisions[0] and second["gate_decision"] == gate.decisions[1]
    assert second["eval_before"] == first["eval_after"]  # the accepted block's report is the next baseline
    decision = second["gate_decision"]
    assert decision["decision"] == "rejected" and decision["reasons"][0].startswith("perplexity")
    assert (decision["block"], decision["start_step"], decision["end_step"], decision["snapshot_step"]) == (2, 2, 4, 2)
    assert decision["ppl_after"] == second["eval_after"]["perplexity"]["ppl"]
    assert not decision["ppl_after"] <= decision["ppl_before"] * 1.05
    assert (decision["max_ppl_increase"], decision["max_probe_drop"]) == (0.05, 0.05)
    assert not (tmp_path / "gates" / "block_0003").exists()  # no steps after block 2: nothing to gate


def test_two_rejected_blocks_in_a_row_restore_the_same_block_start(tmp_path, shards, tokenizer_path):
    """On a CPU the restored optimizer took the snapshot's tensors as its own, and the next block's AdamW updates
    changed the snapshot in place: a second rejection restored the moments and step count of that block's end."""
    module = Student(tokenizer_path, val_config(shards))
    recorder, gate = Recorder(), RegressionGate(every_n_steps=2, out_dir=str(tmp_path / "gates"))
    trainer = fit(tmp_path, module, shards, 6, [Corrupt(at_step=3), Corrupt(at_step=5), recorder, gate])
    assert [d["decision"] for d in gate.decisions] == ["accepted", "rejected", "rejected"]
    assert not same(recorder.states[6][1], recorder.states[2][1])  # the third block moved AdamW's state
    assert same(trainer.optimizers[0].state_dict(), recorder.states[2][1])
    assert same(module.state_dict(), recorder.states[2][0])


class ScheduledStudent(Student):
    """A Student whose learning rate falls every step."""

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_a_rejected_block_keeps_the_learning_rate_of_the_schedule(tmp_path, shards, tokenizer_path):
    """The schedule is not rewound, but the snapshot's optimizer groups held the block start's rate: the
    step after a rejection ran at it (SDFT's train/lr read 0.001 between 0.000689 and 0.000186)."""
    module = ScheduledStudent(tokenizer_path, val_config(shards))
    gate = RegressionGate(every_n_steps=2, out_dir=str(tmp_path / "gates"))
    trainer = fit(tmp_path, module, shards, 4, [Corrupt(at_step=3), gate])
    assert [d["decision"] for d in gate.decisions] == ["accepted", "rejected"]
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == scheduler.get_last_lr() == [1e-3 / 5]


def test_a_harmless_block_is_accepted_and_keeps_its_weights(tmp_path, shards, tokenizer_path):
    module = Student(tokenizer_path, val_config(shards), lr=1e-3)
    recorder, gate = Recorder(), RegressionGate(every_n_steps=2)
    fit(tmp_path, module, shards, 4, [recorder, gate])

    assert [d["decision"] for d in gate.decisions] == ["accepted", "accepted"] and gate.rejections == 0
    assert all(d["reasons"] == [] and d["ppl_increase"] <= 0.05 for d in gate.decisions)
    assert not same(recorder.states[4][0], recorder.states[2][0])  # the block trained the weights...
    assert same(module.state_dict(), recorder.states[4][0])  # ...and the gate kept them
    second = read_block(tmp_path / "gates", 2)  # default out_dir: the trainer's log dir (here its root)
    assert second["gate_decision"]["decision"] == "accepted"
    assert second["gate_decision"]["ppl_before"] == read_block(tmp_path / "gates", 1)["eval_after"]["perplexity"]["ppl"]


def report(ppl: float | None, accuracy: float | None) -> dict:
    return {"perplexity": None if ppl is None else {"ppl": ppl, "loss": math.log(ppl)},
            "probes": None if accuracy is None else {"accuracy": accuracy}}


@pytest.mark.parametrize(
    "before, after, reasons",
    [((10.0, 0.8), (10.5, 0.75), []),  # exactly at both thresholds
     ((10.0, 0.8), (9.0, 1.0), []),
     ((10.0, 0.8), (10.6, 0.8), ["perplexity rose by 6.00% (10 -> 10.6), more than max_ppl_increase 5.00%"]),
     ((10.0, 0.8), (10.0, 0.7), ["probe accuracy fell by 0.100 (0.800 -> 0.700), more than max_probe_drop 0.050"]),
     ((10.0, 0.8), (20.0, 0.5), ["perplexity rose by", "probe accuracy fell by 0.300"]),
     ((10.0, None), (math.inf, None), ["perplexity after the block is not finite (inf)"]),
     ((10.0, None), (math.nan, None), ["perplexity after the block is not finite (nan)"]),
     ((None, 1.0), (None, 0.9), ["probe accuracy fell by 0.100"]),
     ((None, 1.0), (None, 0.96), [])],
)
def test_gate_decision_compares_perplexity_and_probe_accuracy(before, after, reasons):
    decision = gate_decision(report(*before), report(*after), max_ppl_increase=0.05, max_probe_drop=0.05)
    assert decision["decision"] == ("rejected" if reasons else "accepted")
    assert len(decision["reasons"]) == len(reasons)
    assert all(got.startswith(want) for got, want in zip(decision["reasons"], reasons, strict=True))
    assert (decision["ppl_before"], decision["probe_accuracy_before"]) == before
    if before[0] is None:
        assert decision["ppl_after"] is None and decision["ppl_increase"] is None
    elif math.isfinite(after[0]):
        assert decision["ppl_increase"] == pytest.approx(after[0] / before[0] - 1)
    if before[1] is None:
        assert decision["probe_accuracy_after"] is None and decision["probe_drop"] is None
    else:
        assert decision["probe_drop"] == pytest.approx(before[1] - after[1])


def test_a_probe_accuracy_drop_rejects_the_block(tmp_path, shards, tokenizer_path):
    module = Student(tokenizer_path, None, lr=0.0)
    initial = copy.deepcopy(module.state_dict())
    scored = score_probes(module.model, module.tokenizer, [Probe("any", PROMPT, expect_regex=".")], max_new_tokens=8)
    completion = scored["results"][0]["completion"]
    assert len(completion) >= 3
    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"name": "continues", "prompt": PROMPT, "expect_substring": completion}) + "\n")
    gate = RegressionGate(every_n_steps=2, max_probe_drop=0.5, evaluation=EvalConfig(probes=str(probes),
                                                                                      max_new_tokens=8))
    fit(tmp_path, module, shards, 2, [Corrupt(at_step=1), gate])

    (decision,) = gate.decisions
    assert (decision["probe_accuracy_before"], decision["probe_accuracy_after"], decision["probe_drop"]) == (1, 0, 1)
    assert decision["decision"] == "rejected" and len(decision["reasons"]) == 1
    assert decision["reasons"][0].startswith("probe accuracy fell by 1.000 (1.000 -> 0.000)")
    assert decision["ppl_before"] is None and decision["ppl_increase"] is None  # no perplexity configured
    assert same(module.state_dict(), initial)
    after = read_block(tmp_path / "gates", 1)["eval_after"]
    assert after["perplexity"] is None and after["probes"]["results"][0]["passed"] is False


def test_the_last_partial_block_is_gated_at_train_end_and_logged(tmp_path, shards, tokenizer_path):
    module = Student(tokenizer_path, None)
    gate = RegressionGate(every_n_steps=3, evaluation=val_config(shards))  # the callback's config, not the module's
    logger = CSVLogger(tmp_path, name="run")
    trainer = fit(tmp_path, module, shards, -1, [gate], logger=logger, max_epochs=1, samples_per_epoch=20)
    assert trainer.global_step == 5  # one epoch of 20 windows in batches of 4: the run ends before a 2nd full block

    assert [(d["block"], d["start_step"], d["end_step"]) for d in gate.decisions] == [(1, 0, 3), (2, 3, 5)]
    assert read_block(Path(logger.log_dir) / "gates", 2)["gate_decision"] == gate.decisions[1]
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        rows = {int(row["step"]): row for row in csv.DictReader(f) if row["gate/accepted"]}
    assert sorted(rows) == [3, 5]
    for step, decision in zip((3, 5), gate.decisions, strict=True):
        assert float(rows[step]["gate/accepted"]) == 1.0 and float(rows[step]["gate/rejections"]) == 0.0
        assert float(rows[step]["gate/ppl"]) == pytest.approx(decision["ppl_after"])
        assert float(rows[step]["gate/ppl_increase"]) == pytest.approx(decision["ppl_increase"])
        assert "gate/probe_drop" not in rows[step]  # no probes: not logged

    ckpt = tmp_path / "gated.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["callbacks"]["RegressionGate"]  # plain data only
    assert state == gate.state_dict() == {"blocks": 2, "rejections": 0, "decisions": gate.decisions,
                                          "snapshot_step": 5}

    gates = Path(logger.log_dir) / "gates"
    resumed = RegressionGate(every_n_steps=3, evaluation=val_config(shards), out_dir=str(gates))
    fit(tmp_path, Student(tokenizer_path, None), shards, 6, [resumed], ckpt_path=ckpt, samples_per_epoch=20)
    assert resumed.decisions[:2] == gate.decisions and resumed.blocks == 3
    third = read_block(gates, 3)  # a fresh block at the resumed weights, 1 step long: max_steps ends it
    assert (third["gate_decision"]["start_step"], third["gate_decision"]["end_step"]) == (5, 6)
    assert third["eval_before"] == read_block(gates, 2)["eval_after"]


class InterruptAt(L.Callback):
    """Ctrl-C before the step ``at_step`` + 1, as a user's mid-run."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, module, *args) -> None:
        if trainer.global_step == self.at_step:
            raise KeyboardInterrupt


def test_a_block_interrupted_and_resumed_is_gated_as_the_uninterrupted_one(tmp_path, shards, tokenizer_path):
    """The Ctrl-C checkpoint holds the block's ungated weights: the resume took them for its baseline and accepted
    the regression. It now finishes the block against the baseline and snapshot the checkpoint holds."""
    from llmkit.callbacks import Checkpoint

    def run(root: Path, callbacks: list, ckpt_path: Path | None = None) -> tuple[Student, RegressionGate]:
        module, gate = Student(tokenizer_path, val_config(shards)), RegressionGate(every_n_steps=4,
                                                                                  out_dir=str(root / "gates"))
        checkpoint = Checkpoint(dirpath=root / "ckpt", every_n_train_steps=100)
        try:
            fit(root, module, shards, 4, [Corrupt(at_step=1), *callbacks, checkpoint, gate], ckpt_path=ckpt_path,
                enable_checkpointing=True)
        except SystemExit:  # Lightning's graceful shutdown after Ctrl-C
            pass
        return module, gate

    initial = copy.deepcopy(Student(tokenizer_path, None).state_dict())
    straight, straight_gate = run(tmp_path / "straight", [])
    run(tmp_path / "interrupted", [InterruptAt(2)])
    last = tmp_path / "interrupted" / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 2 and saved["callbacks"]["RegressionGate"]["block"]["start_step"] == 0
    resumed, resumed_gate = run(tmp_path / "interrupted", [], ckpt_path=last)

    assert [d["decision"] for d in straight_gate.decisions] == ["rejected"]
    assert resumed_gate.decisions == straight_gate.decisions  # the same block 0-4, baseline and verdict
    assert same(resumed.state_dict(), initial) and same(straight.state_dict(), initial)  # restored to step 0
    assert not torch.load(tmp_path / "interrupted" / "ckpt" / "last.ckpt", weights_only=True)["callbacks"][
        "RegressionGate"].get("block")  # saved at a block's end: no snapshot to carry


def test_a_run_resumed_after_a_rejected_block_names_the_weights_it_kept_by_their_step(tmp_path, shards,
                                                                                      tokenizer_path):
    """Resumed at the end of a rejected block, the gate took the restored weights for the resume step's: the
    next decisions said "weights of step 2" where the uninterrupted run's said step 0, which they are."""
    from llmkit.callbacks import Checkpoint

    def run(root: Path, max_steps: int, ckpt_path: Path | None = None) -> RegressionGate:
        gate = RegressionGate(every_n_steps=2, out_dir=str(root / "gates"))
        fit(root, Student(tokenizer_path, val_config(shards)), shards, max_steps,
            [Corrupt(at_step=1), Checkpoint(dirpath=root / "ckpt", every_n_train_steps=100), gate],
            ckpt_path=ckpt_path, enable_checkpointing=True)
        return gate

    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    resumed = run(tmp_path / "resumed", 4, ckpt_path=tmp_path / "resumed" / "ckpt" / "last.ckpt")
    assert straight.decisions[0]["decision"] == "rejected"
    assert [d["snapshot_step"] for d in resumed.decisions] == [d["snapshot_step"] for d in straight.decisions] == [0, 0]


class GateInterruptedAt(RegressionGate):
    """A gate whose evaluation at the end of the block ending at ``at_step`` is cut by Ctrl-C, once."""

    def __init__(self, at_step: int | None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.at_step = at_step

    def _evaluate(self, trainer, pl_module) -> dict:
        if trainer.global_step == self.at_step and self.at_step is not None:
            self.at_step = None
            raise KeyboardInterrupt
        return super()._evaluate(trainer, pl_module)


def test_an_interrupt_while_gating_a_block_gates_that_block_on_resume(tmp_path, shards, tokenizer_path):
    """The checkpoint saved while the gate evaluated step 3, the end of block 0-3, resumed that block
    and trained on: block 1 became steps 0-5 and block 0-3's reports were never written."""
    from llmkit.callbacks import Checkpoint

    def run(root: Path, gate: RegressionGate, ckpt_path: Path | None = None) -> Student:
        module = Student(tokenizer_path, val_config(shards))
        try:
            fit(root, module, shards, 5, [Checkpoint(dirpath=root / "ckpt", every_n_train_steps=100), gate],
                ckpt_path=ckpt_path, enable_checkpointing=True)
        except SystemExit:  # Lightning's graceful shutdown after Ctrl-C
            pass
        return module

    straight_gate = RegressionGate(every_n_steps=3, out_dir=str(tmp_path / "straight" / "gates"))
    straight = run(tmp_path / "straight", straight_gate)
    gates = tmp_path / "interrupted" / "gates"
    run(tmp_path / "interrupted", GateInterruptedAt(3, every_n_steps=3, out_dir=str(gates)))
    resumed_gate = GateInterruptedAt(None, every_n_steps=3, out_dir=str(gates))  # its state_key: the same class
    resumed = run(tmp_path / "interrupted", resumed_gate, ckpt_path=tmp_path / "interrupted" / "ckpt" / "last.ckpt")
    assert [(d["start_step"], d["end_step"]) for d in straight_gate.decisions] == [(0, 3), (3, 5)]
    assert resumed_gate.decisions == straight_gate.decisions
    assert read_block(gates, 1) == read_block(tmp_path / "straight" / "gates", 1)
    assert same(resumed.state_dict(), straight.state_dict())


@pytest.mark.parametrize("thresholds", [{"max_ppl_increase": math.nan}, {"max_ppl_increase": math.inf},
                                        {"max_probe_drop": math.nan}, {"max_probe_drop": 1.5}])
def test_a_threshold_that_would_turn_the_gate_off_is_refused(thresholds):
    with pytest.raises(LLMKitError, match="max_ppl_increase must be a number >= 0 and max_probe_drop one in"):
        RegressionGate(**thresholds)


def test_a_rejected_last_block_never_reaches_the_last_checkpoint(tmp_path, shards, tokenizer_path):
    module = Student(tokenizer_path, val_config(shards))
    recorder, gate = Recorder(), RegressionGate(every_n_steps=3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path, module, shards, 5, [Corrupt(at_step=4), checkpoint, recorder, gate], enable_checkpointing=True)

    assert [(d["end_step"], d["decision"]) for d in gate.decisions] == [(3, "accepted"), (5, "rejected")]
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 5
    assert same(saved["state_dict"], recorder.states[3][0]) and same(module.state_dict(), recorder.states[3][0])


@pytest.mark.parametrize("evaluation", [None, EvalConfig()])
def test_a_gate_with_nothing_to_evaluate_refuses_to_start(tmp_path, shards, tokenizer_path, evaluation):
    with pytest.raises(LLMKitError, match="RegressionGate has nothing to evaluate: set evaluation.ppl_files"):
        fit(tmp_path, Student(tokenizer_path, evaluation), shards, 1, [RegressionGate(evaluation=evaluation)])


def test_probes_need_a_tokenizer_and_blocks_a_step(tmp_path, shards):
    with pytest.raises(LLMKitError, match="RegressionGate needs the LightningModule to have `tokenizer` .* to complete "
                                          "the probes .*p.jsonl; Student does not"):
        fit(tmp_path, Student(None, EvalConfig(probes=str(tmp_path / "p.jsonl"))), shards, 1, [RegressionGate()])
    with pytest.raises(LLMKitError, match="every_n_steps must be >= 1, got 0"):
        RegressionGate(every_n_steps=0)
