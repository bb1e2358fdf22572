"""SDFTModule, SFTModule and the EMATeacher: alignment, gradients, EMA, accumulation, CLI."""

from __future__ import annotations

import json
import math
import re
import signal
import warnings
from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml

from llmkit.callbacks import EMATeacher
from llmkit.cli import main
from llmkit.data.examples import teacher_prompt
from llmkit.data.sdft_data import SDFTDataModule
from llmkit.data.tasks import write_task_files
from llmkit.data.tokenizer import TokenizerTrainConfig, train_tokenizer
from llmkit.errors import LLMKitError
from llmkit.model.checkpoint import load_backbone
from llmkit.model.config import ModelConfig
from llmkit.model.generation import continuation_logits, generate
from llmkit.model.transformer import Transformer
from llmkit.modules.distill import distill_loss_sum
from llmkit.modules.sdft import VAL_SEED, SDFTConfig, SDFTModule
from llmkit.modules.sft import SFTModule
from tests.conftest import VOCAB_SIZE, ctrl_c_right_after_update

CONFIG = ModelConfig(vocab_size=VOCAB_SIZE, n_layers=2, d_model=48, n_heads=4, d_ff=96, max_seq_len=192, n_streams=2)


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory) -> Path:
    """A random backbone whose output head is scaled up, so its distributions are peaked and
    depend on the context (a fresh init is nearly uniform everywhere)."""
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    path = tmp_path_factory.mktemp("base") / "base.ckpt"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"config": CONFIG.to_dict()}}, path)
    return path


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tasks") / "arithmetic.jsonl"
    write_task_files("arithmetic", 16, seed=0, out=path)
    return path


def trainer(max_steps: int, callbacks: list | None = None, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks or [], **kwargs,
    )


def sdft(base_ckpt, tokenizer_path, **kwargs) -> SDFTModule:
    kwargs.setdefault("sdft", {"max_new_tokens": 12})
    kwargs.setdefault("optim", {"lr": 1e-3, "warmup_steps": 1, "min_lr_ratio": 1.0})
    return SDFTModule(init_ckpt=str(base_ckpt), tokenizer=str(tokenizer_path), **kwargs)


def test_student_and_teacher_slices_predict_the_sampled_tokens(base_ckpt, tokenizer_path, examples):
    """F4: whatever the padding, row b's slice equals the logits of its own unpadded
    context + y at positions C_b - 1 ... C_b - 2 + L_b, for the student and the teacher."""
    module = sdft(base_ckpt, tokenizer_path)
    data = SDFTDataModule(str(examples))
    data.setup("fit")
    batch = data.train_examples[:3]
    tok = module.tokenizer
    students = [tok.encode(e.prompt) for e in batch]
    teachers = [tok.encode(teacher_prompt(e)) for e in batch]
    ys = [[5, 9, 11], [7], [12, 4, tok.eos_id]]
    for contexts, model in ((students, module.model), (teachers, module.teacher)):
        sliced, targets, mask = continuation_logits(model, contexts, ys, tok.pad_id)
        for row, (context, y) in enumerate(zip(contexts, ys, strict=True)):
            alone = model(torch.tensor([context + y]))[0, len(context) - 1 : len(context) - 1 + len(y)]
            assert torch.allclose(sliced[row, : len(y)], alone, atol=1e-4)
            assert mask[row].sum() == len(y) and targets[row, : len(y)].tolist() == y


def test_loss_counts_every_completion_token_eos_included_and_only_those(base_ckpt, tokenizer_path, examples):
    module = sdft(base_ckpt, tokenizer_path, sdft={"max_new_tokens": 12, "skip_first": 2})
    data = SDFTDataModule(str(examples))
    data.setup("fit")
    batch = data.train_examples[:4]
    torch.manual_seed(1)
    total, count = module.loss_sum(batch, "train", 0)
    torch.manual_seed(1)  # the same completions again
    prompts = [module.tokenizer.encode(e.prompt) for e in batch]
    y = generate(module.model, prompts, module.sdft.sampling(), module.tokenizer.eos_id, module.tokenizer.pad_id)
    lengths = y.mask.sum(1)
    assert count == int((lengths - 2).clamp(min=0).sum())
    assert total > 0 and total.requires_grad


def test_sampling_settings_reach_the_sampler(base_ckpt, tokenizer_path, examples, monkeypatch):
    seen = []

    def spy(model, prompts, config, eos_id, pad_id):
        seen.append(config)
        return generate(model, prompts, replace(config, compile=False), eos_id, pad_id)

    monkeypatch.setattr("llmkit.modules.sdft.generate", spy)
    module = sdft(base_ckpt, tokenizer_path, sdft={"max_new_tokens": 7, "temperature": 0.7, "sample_top_p": 0.9,
                                                   "compile_sampler": True})
    data = SDFTDataModule(str(examples))
    data.setup("fit")
    module.loss_sum(data.train_examples[:2], "val", 3)
    (config,) = seen
    assert (config.max_new_tokens, config.temperature, config.top_p, config.compile) == (7, 0.7, 0.9, True)
    assert config.seed == VAL_SEED + 3  # validation samples with a fixed seed per batch


def test_the_attention_kernel_can_be_chosen_for_a_checkpoint_trained_with_another(base_ckpt, tokenizer_path):
    assert sdft(base_ckpt, tokenizer_path).model.config.attention_backend == "auto"  # the checkpoint's
    module = sdft(base_ckpt, tokenizer_path, attention_backend="math")
    assert module.model.config.attention_backend == module.teacher.config.attention_backend == "math"
    assert module.hparams.attention_backend == "math"


def test_teacher_gets_no_gradient_and_follows_the_ema_formula(base_ckpt, tokenizer_path, examples):
    tau = 0.8

    class Record(L.Callback):
        """Student weights after each optimizer step (runs before EMATeacher: list order)."""

        def __init__(self) -> None:
            self.students: list[dict[str, torch.Tensor]] = []
            self.step = 0

        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            if trainer.global_step != self.step:
                self.step = trainer.global_step
                self.students.append({k: v.double().clone() for k, v in pl_module.model.named_parameters()})
            assert all(p.grad is None for p in pl_module.teacher.parameters())

    module = sdft(base_ckpt, tokenizer_path)
    expected = {k: v.double().clone() for k, v in module.teacher.named_parameters()}
    record, ema = Record(), EMATeacher(decay=tau)
    trainer(3, [record, ema]).fit(module, SDFTDataModule(str(examples), batch_size=4))
    assert len(record.students) == 3 and ema.updates == 3
    for student in record.students:
        expected = {k: tau * expected[k] + (1 - tau) * student[k] for k in expected}
    moved = 0.0
    for name, param in module.teacher.named_parameters():
        assert not param.requires_grad and param.grad is None
        assert torch.allclose(param.double(), expected[name], atol=1e-6), name
        moved = max(moved, (param.double() - record.students[0][name]).abs().max().item())
    assert moved > 0  # the teacher is not simply the student


def test_an_moe_teacher_averages_the_routing_bias_and_stays_in_eval_mode():
    """The balancing bias is a buffer moved by a rule, not by gradient: the average covers it, and
    the teacher (eval mode) counts no routing load of its own."""
    from types import SimpleNamespace

    config = ModelConfig(vocab_size=VOCAB_SIZE, n_layers=1, d_model=32, n_heads=4, d_ff=64, max_seq_len=32,
                         moe={"n_experts": 4, "top_k": 2, "expert_dim": 16, "bias_update_rate": 0.01})
    student = Transformer(config)
    module = SimpleNamespace(model=student, teacher=Transformer(config).requires_grad_(False))
    module.teacher.load_state_dict(student.state_dict())
    ema = EMATeacher(decay=0.5)
    ema.last_step = 0
    router = student.blocks[0].mlp.router
    router.bias += torch.tensor([0.04, -0.02, 0.0, 0.02])
    ema.on_train_batch_end(SimpleNamespace(global_step=1), module, None, None, 0)
    assert torch.allclose(module.teacher.blocks[0].mlp.router.bias, router.bias / 2)

    sdft_module = SDFTModule.__new__(SDFTModule)  # the train/eval switch alone, on a built module's parts
    L.LightningModule.__init__(sdft_module)
    sdft_module.model, sdft_module.teacher = student, module.teacher
    sdft_module.train()
    assert sdft_module.model.training and not sdft_module.teacher.training
    sdft_module.teacher(torch.randint(0, VOCAB_SIZE, (2, 8)))
    assert module.teacher.blocks[0].mlp.router.load.sum() == 0  # the student's load alone moves the bias


def test_the_teacher_stays_in_eval_mode_through_fit(base_ckpt, tokenizer_path, examples):
    """It was built in training mode, and fit calls no train() that the module's switch would catch."""
    modes = []

    class Modes(L.Callback):
        def on_train_batch_end(self, trainer, module, *args) -> None:
            modes.append((module.model.training, module.teacher.training))

    module = sdft(base_ckpt, tokenizer_path)
    L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1, val_check_interval=1,
              callbacks=[Modes()]).fit(module, SDFTDataModule(str(examples), val_files=str(examples), batch_size=2))
    assert modes == [(True, False), (True, False)]


@pytest.mark.parametrize("student_in_eval_mode", [False, True])
def test_only_a_student_module_in_eval_mode_draws_lightnings_eval_mode_warning(student_in_eval_mode, base_ckpt,
                                                                               tokenizer_path, examples):
    """The teacher is in eval mode by design: Lightning's "module(s) in eval mode" warning would only
    alarm; a module of the student left in eval mode is worth it, counted with the teacher's."""
    module = sdft(base_ckpt, tokenizer_path)
    if student_in_eval_mode:
        module.model.blocks[0].eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(1).fit(module, SDFTDataModule(str(examples), batch_size=2))
    found = [str(w.message).split(" in eval mode")[0] for w in caught if " in eval mode" in str(w.message)]
    student = len(list(module.model.blocks[0].modules())) if student_in_eval_mode else 0
    assert found == ([f"Found {len(list(module.teacher.modules())) + student} module(s)"] if student else [])


def test_without_val_files_fit_skips_validation_without_lightnings_zero_length_warning(base_ckpt, tokenizer_path,
                                                                                    examples):
    module = SFTModule(init_ckpt=str(base_ckpt), tokenizer=str(tokenizer_path))
    run = trainer(2, val_check_interval=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.fit(module, SDFTDataModule(str(examples), batch_size=2))
    assert run.global_step == 2 and "val/ppl" not in run.callback_metrics
    assert [str(w.message) for w in caught if "across ranks is zero" in str(w.message)] == []


def test_a_resumed_sdft_run_samples_and_ends_as_an_uninterrupted_one(base_ckpt, tokenizer_path, examples, tmp_path):
    """The samples' seeds are checkpointed (RankSeeds), not replayed from the run's seed."""
    def run(max_steps: int, ckpt_path=None) -> SDFTModule:
        L.seed_everything(0, verbose=False)
        module = sdft(base_ckpt, tokenizer_path)
        fitted = trainer(max_steps, [EMATeacher(decay=0.5)])
        fitted.fit(module, SDFTDataModule(str(examples), batch_size=4), ckpt_path=ckpt_path)
        if ckpt_path is None:
            fitted.save_checkpoint(tmp_path / f"step{max_steps}.ckpt")
        return module

    straight, _ = run(4), run(2)
    torch.randint(0, 10, (5,))  # a resume in another process: the global generator is wherever it is
    resumed = run(4, tmp_path / "step2.ckpt")
    assert resumed.seeds.state_dict() == straight.seeds.state_dict()
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_ema_teacher_is_saved_and_restored_with_the_checkpoint(base_ckpt, tokenizer_path, examples, tmp_path):
    module = sdft(base_ckpt, tokenizer_path)
    run = trainer(2, [EMATeacher(decay=0.5)])
    run.fit(module, SDFTDataModule(str(examples), batch_size=4))
    run.save_checkpoint(tmp_path / "sdft.ckpt")
    ckpt = torch.load(tmp_path / "sdft.ckpt", weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if "EMATeacher" in k]
    assert state["updates"] == 2 and state["last_step"] == 2
    resumed_ema = EMATeacher(decay=0.5)
    resumed = sdft(base_ckpt, tokenizer_path)
    data = SDFTDataModule(str(examples), batch_size=4)
    trainer(3, [resumed_ema]).fit(resumed, data, ckpt_path=tmp_path / "sdft.ckpt")
    assert resumed_ema.updates == 3  # restored 2, then one more step
    # `llmkit generate` and later fine-tuning read the student alone from an SDFT checkpoint
    student = load_backbone(tmp_path / "sdft.ckpt")
    for name, param in student.named_parameters():
        assert torch.equal(param, module.model.state_dict()[name])


def sft_gradients(base_ckpt, tokenizer_path, examples, batch_size: int, accumulate: int) -> dict[str, torch.Tensor]:
    """The gradients the first optimizer step applies, captured before it."""
    grads: dict[str, torch.Tensor] = {}

    class Capture(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            grads.update({k: p.grad.clone() for k, p in pl_module.model.named_parameters()})

    module = SFTModule(str(base_ckpt), str(tokenizer_path), accumulate_grad_batches=accumulate,
                       gradient_clip_val=None)
    trainer(1, [Capture()]).fit(module, SDFTDataModule(str(examples), batch_size=batch_size, seed=3))
    return grads


def test_accumulated_gradients_are_a_mean_per_real_token(base_ckpt, tokenizer_path, tmp_path):
    """Micro-batches of 1 and 3 examples of different lengths, accumulated, give the gradient of
    one batch of all 4: the mean over real tokens, not the mean of micro-batch means."""
    path = tmp_path / "four.jsonl"
    lines = [{"prompt": "def f(", "demonstration": "x" * n} for n in (1, 5, 12, 30)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    one = sft_gradients(base_ckpt, tokenizer_path, path, batch_size=4, accumulate=1)
    split = sft_gradients(base_ckpt, tokenizer_path, path, batch_size=2, accumulate=2)
    assert one.keys() == split.keys()
    for name in one:
        assert torch.allclose(one[name], split[name], rtol=1e-4, atol=1e-7), name


def test_a_validation_between_the_micro_batches_of_a_step_leaves_their_gradients(base_ckpt, tokenizer_path, examples):
    """Lightning zeroes the gradients before a validation it runs between optimizer steps, and a module that
    accumulates by hand is always between them to Lightning: a validation after a step's first micro-batch
    wiped its gradient, and the step applied the second micro-batch's alone (divided by both's tokens)."""
    def fit(validations: int) -> SFTModule:
        module = SFTModule(str(base_ckpt), str(tokenizer_path), accumulate_grad_batches=2,
                           optim={"lr": 1e-3, "warmup_steps": 1})
        data = SDFTDataModule(str(examples), val_files=str(examples), batch_size=2, seed=3)
        trainer(2, val_check_interval=1, limit_val_batches=validations).fit(module, data)
        return module

    torch.testing.assert_close(fit(1).state_dict(), fit(0).state_dict(), rtol=0, atol=0)


def test_sdft_resumed_after_ctrl_c_right_after_an_update_ends_as_the_uninterrupted_run(
        base_ckpt, tokenizer_path, examples, tmp_path, monkeypatch, ctrl_c):
    """A Ctrl-C right after the second optimizer step (the real signal) took back the batch whose update had
    landed and whose EMA teacher update had not: the resume trained that batch again."""
    from llmkit.callbacks import Checkpoint

    def run(root: Path, ckpt_path: Path | None = None) -> SDFTModule:
        L.seed_everything(0, verbose=False)  # the module's sampling seeds
        module = sdft(base_ckpt, tokenizer_path)
        trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0,
                            callbacks=[EMATeacher(decay=0.5), Checkpoint(dirpath=root, every_n_train_steps=100)])
        trainer.fit(module, SDFTDataModule(str(examples), batch_size=4, seed=3), ckpt_path=ckpt_path)
        return module

    straight = run(tmp_path / "straight")
    ctrl_c_right_after_update(monkeypatch, step=2)
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown after Ctrl-C
        run(tmp_path / "interrupted")
    assert torch.load(tmp_path / "interrupted" / "last.ckpt", weights_only=True)["global_step"] == 2
    monkeypatch.undo()
    resumed = run(tmp_path / "interrupted", ckpt_path=tmp_path / "interrupted" / "last.ckpt")
    torch.testing.assert_close(resumed.state_dict(), straight.state_dict(), rtol=0, atol=0)  # teacher included


class CtrlCAfterTheBackwardOfBatch2(L.Callback):
    """A real Ctrl-C after the backward of the third batch, the first micro-batch of the second step (2 a step),
    after which a validation is due (every 3 batches)."""

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.fit_loop.epoch_loop.batch_idx == 2:
            signal.raise_signal(signal.SIGINT)


class CtrlCBeforeBatch3(L.Callback):
    """Ctrl-C before the fourth batch: the second micro-batch of the second step, at 2 a step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 3:
            raise KeyboardInterrupt


def test_a_fine_tuning_run_resumed_between_the_micro_batches_of_a_step_ends_as_the_uninterrupted_one(
        base_ckpt, tokenizer_path, examples, tmp_path):
    """The checkpoint held neither the step's first micro-batch's gradient nor its loss and token sums: the resumed
    step applied the second micro-batch's gradient alone, and every later step paired the wrong micro-batches."""
    from llmkit.callbacks import Checkpoint

    def run(root: Path, callbacks: list, ckpt_path: Path | None = None) -> SFTModule:
        module = SFTModule(str(base_ckpt), str(tokenizer_path), accumulate_grad_batches=2,
                           optim={"lr": 1e-3, "warmup_steps": 1})
        trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0,
                            callbacks=[Checkpoint(dirpath=root, every_n_train_steps=100), *callbacks])
        trainer.fit(module, SDFTDataModule(str(examples), batch_size=2, seed=3), ckpt_path=ckpt_path)
        return module

    straight = run(tmp_path / "straight", [])
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown after Ctrl-C
        run(tmp_path / "interrupted", [CtrlCBeforeBatch3()])
    saved = torch.load(tmp_path / "interrupted" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 1 and saved["llmkit_accumulation_window"]["accumulator"]["micro_batches"] == 1
    resumed = run(tmp_path / "interrupted", [], ckpt_path=tmp_path / "interrupted" / "last.ckpt")
    torch.testing.assert_close(resumed.model.state_dict(), straight.model.state_dict(), rtol=0, atol=0)


def test_sft_loss_is_the_demonstration_and_eos_likelihood(base_ckpt, tokenizer_path, examples):
    module = SFTModule(str(base_ckpt), str(tokenizer_path))
    data = SDFTDataModule(str(examples))
    data.setup("fit")
    example = data.train_examples[0]
    tok = module.tokenizer
    prompt, target = tok.encode(example.prompt), tok.encode(example.demonstration) + [tok.eos_id]
    total, count = module.loss_sum([example], "train", 0)
    logits = module.model(torch.tensor([prompt + target]))[0, len(prompt) - 1 : -1]
    assert count == len(target)
    assert torch.allclose(total, F.cross_entropy(logits, torch.tensor(target), reduction="sum"), rtol=1e-5)


@pytest.mark.slow
def test_sdft_lowers_the_teacher_student_divergence_on_its_prompts(base_ckpt, tokenizer_path, examples):
    module = sdft(base_ckpt, tokenizer_path)
    data = SDFTDataModule(str(examples), str(examples), batch_size=8)
    run = trainer(24, [EMATeacher(decay=0.99)], limit_val_batches=2)
    (before,) = run.validate(module, data, verbose=False)
    run.fit(module, data)
    (after,) = run.validate(module, data, verbose=False)
    assert after["val/divergence"] < 0.5 * before["val/divergence"], (before, after)


def test_validation_logs_the_epochs_shortest_and_longest_completion(base_ckpt, tokenizer_path, examples, monkeypatch):
    """val/gen_len_min and _max are over every completion of the epoch, not means of per-batch extremes."""
    module = sdft(base_ckpt, tokenizer_path)
    lengths = []

    def completions(prompts: list[list[int]], seed: int) -> list[list[int]]:  # batch k: lengths 3k+1 .. 3k+4
        batch = [[5] * (1 + 3 * (len(lengths) // 4) + row) for row in range(len(prompts))]
        lengths.extend(len(c) for c in batch)
        return batch

    monkeypatch.setattr(module, "sample_completions", completions)
    (metrics,) = trainer(1).validate(module, SDFTDataModule(str(examples), str(examples), batch_size=4), verbose=False)
    assert len(lengths) == 16
    assert (metrics["val/gen_len_min"], metrics["val/gen_len_max"]) == (min(lengths), max(lengths)) == (1, 13)


def test_a_validation_after_fit_in_the_same_process_is_logged_at_the_step_fit_ended(base_ckpt, tokenizer_path,
                                                                                     examples):
    module, data = sdft(base_ckpt, tokenizer_path), SDFTDataModule(str(examples), str(examples), batch_size=4)
    run = trainer(2, limit_val_batches=1)
    run.fit(module, data)
    (metrics,) = run.validate(module, data, verbose=False)
    assert metrics["step"] == 2


def test_sdft_under_bf16_mixed_samples_and_still_trains_its_own_fp32_weights(base_ckpt, tokenizer_path, examples):
    """bf16-mixed on the CPU: the sampler holds bf16 copies of the weights inside each training
    step (llmkit.model.generation), and the optimizer still trains the model's own fp32 ones."""
    module = sdft(base_ckpt, tokenizer_path)
    data = SDFTDataModule(str(examples), str(examples), batch_size=8)
    run = trainer(24, [EMATeacher(decay=0.99)], limit_val_batches=2, precision="bf16-mixed")
    (before,) = run.validate(module, data, verbose=False)
    start = {name: p.detach().clone() for name, p in module.model.named_parameters()}
    run.fit(module, data)
    (after,) = run.validate(module, data, verbose=False)
    assert after["val/divergence"] < 0.5 * before["val/divergence"], (before, after)
    assert all(p.dtype == torch.float32 for p in module.model.parameters())
    assert not torch.equal(module.model.blocks[0].attn.q_proj.weight, start["blocks.0.attn.q_proj.weight"])


@pytest.mark.gpu
def test_sdft_bf16_mixed_with_gradient_checkpointing_on_gpu(base_ckpt, tokenizer_path, examples):
    module = sdft(base_ckpt, tokenizer_path, gradient_checkpointing=True)
    data = SDFTDataModule(str(examples), str(examples), batch_size=8)
    run = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=24, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
                    limit_val_batches=2, callbacks=[EMATeacher(decay=0.99)])
    (before,) = run.validate(module, data, verbose=False)
    run.fit(module, data)
    (after,) = run.validate(module, data, verbose=False)
    assert module.model.config.gradient_checkpointing
    assert after["val/divergence"] < before["val/divergence"], (before, after)
    assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())


def test_prompts_longer_than_the_context_name_the_example(base_ckpt, tokenizer_path, tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "x = 1\n" * 100, "demonstration": "ok"}) + "\n")
    module = sdft(base_ckpt, tokenizer_path, sdft={"max_new_tokens": 64})
    data = SDFTDataModule(str(path))
    data.setup("fit")
    with pytest.raises(LLMKitError, match=r"long.jsonl:1: the prompt is (\d+) tokens and sdft.max_new_tokens adds 64: "
                                          r"\d+ in all, past the model's max_seq_len 192; shorten it or lower "
                                          r"sdft.max_new_tokens"):
        module.loss_sum(data.train_examples, "train", 0)


@pytest.mark.parametrize("module_class", [SDFTModule, SFTModule])
def test_an_example_too_long_for_the_window_stops_the_run_before_its_first_step(module_class, base_ckpt,
                                                                             tokenizer_path, examples, tmp_path):
    """It was found when its batch came up (step 2 of 20 in the report), after the steps before it."""
    path = tmp_path / "mixed.jsonl"
    lines = examples.read_text().splitlines()  # 16 that fit, then one that does not
    path.write_text("\n".join([*lines, json.dumps({"prompt": "a", "demonstration": "x = 1\n" * 300})]) + "\n")
    settings = {"sdft": {"max_new_tokens": 12}} if module_class is SDFTModule else {}
    module = module_class(init_ckpt=str(base_ckpt), tokenizer=str(tokenizer_path), **settings)
    run = trainer(20)
    adds = "sdft.max_new_tokens adds 12" if module_class is SDFTModule else \
        r"its demonstration \(with the end of its turn\) adds \d+"
    with pytest.raises(LLMKitError, match=rf"mixed.jsonl:17: the (prompt|teacher prompt) is \d+ tokens and {adds}: "):
        run.fit(module, SDFTDataModule(str(path), batch_size=4))
    assert run.global_step == 0


def test_bad_settings_and_a_mismatched_tokenizer_are_clear_errors(base_ckpt, tokenizer_path, tmp_path, corpus_dir):
    with pytest.raises(LLMKitError, match="alpha must be in"):
        sdft(base_ckpt, tokenizer_path, sdft={"alpha": 1.5})
    with pytest.raises(LLMKitError, match="sdft.temperature must be a finite number > 0 .*got inf"):
        SDFTConfig(temperature=math.inf)  # was "must be a finite number >= 0 (0 = greedy)", which 0 is not
    with pytest.raises(LLMKitError, match="decay must be in"):
        EMATeacher(decay=1.0)
    other = train_tokenizer([corpus_dir / "val.txt"], tmp_path / "small", TokenizerTrainConfig(vocab_size=320))
    with pytest.raises(LLMKitError, match="vocab_size 320 but the model"):
        SFTModule(str(base_ckpt), str(other))


def write_cli_config(tmp_path: Path, base_ckpt, tokenizer_path, examples, shards, command: str) -> Path:
    callbacks = [
        {"class_path": "llmkit.callbacks.RegressionGate", "init_args": {"every_n_steps": 2, "max_ppl_increase": 10.0}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}},
    ]
    if command == "sdft":
        callbacks.insert(0, {"class_path": "llmkit.callbacks.EMATeacher", "init_args": {"decay": 0.99}})
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 3, "log_every_n_steps": 1, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path / "logs"), "num_sanity_val_steps": 0,
                    "limit_val_batches": 1, "enable_model_summary": False, "callbacks": callbacks},
        "model": {"init_ckpt": str(base_ckpt), "tokenizer": str(tokenizer_path),
                  "optim": {"lr": 1e-3, "warmup_steps": 1},
                  "evaluation": {"ppl_files": [str(shards["val"])], "seq_len": 32, "max_windows": 2}},
        "data": {"train_files": [str(examples)], "val_files": [str(examples)], "batch_size": 4},
    }
    if command == "sdft":
        config["model"]["sdft"] = {"max_new_tokens": 8}
    path = tmp_path / f"{command}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("command", ["sdft", "sft"])
def test_cli_fit_validate_and_generate(command, base_ckpt, tokenizer_path, examples, shards, tmp_path, capsys):
    config = write_cli_config(tmp_path, base_ckpt, tokenizer_path, examples, shards, command)
    assert main([command, "fit", "--config", str(config)]) == 0
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 3
    gates = sorted((tmp_path / "logs").rglob("gate_decision.json"))
    assert [json.loads(g.read_text())["end_step"] for g in gates] == [2, 3]
    assert main([command, "validate", "--ckpt_path", str(ckpt), "--data.val_files", str(examples),
                 "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / "val"),
                 "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"]) == 0
    out = capsys.readouterr().out
    assert ("val/divergence" if command == "sdft" else "val/loss") in out and "val/ppl" in out
    assert list((tmp_path / "val").rglob("eval/validate_step_000003.json"))
    assert main(["generate", "--ckpt", str(ckpt), "--tokenizer", str(tokenizer_path), "--prompt", "def ",
                 "--max-new-tokens", "5", "--seed", "0"]) == 0


def test_the_divergence_is_that_of_the_tempered_distributions_y_was_sampled_from(base_ckpt, tokenizer_path, examples,
                                                                               monkeypatch):
    seen = {}

    def record_logits(model, *args):
        out = continuation_logits(model, *args)
        seen.setdefault("logits", []).append(out[0].detach())
        return out

    def record_divergence(student, teacher, *args):
        seen["divergence"] = (student.detach(), teacher.detach())
        return distill_loss_sum(student, teacher, *args)

    monkeypatch.setattr("llmkit.modules.sdft.continuation_logits", record_logits)
    monkeypatch.setattr("llmkit.modules.sdft.distill_loss_sum", record_divergence)
    module = sdft(base_ckpt, tokenizer_path, sdft={"max_new_tokens": 6, "temperature": 0.5})
    data = SDFTDataModule(str(examples))
    data.setup("fit")
    module.loss_sum(data.train_examples[:2], "val", 0)
    student, teacher = seen["logits"]
    assert torch.allclose(seen["divergence"][0], student / 0.5) and torch.allclose(seen["divergence"][1], teacher / 0.5)


@pytest.mark.parametrize(("setting", "message"), [
    ({"max_new_tokens": 0}, "sdft.max_new_tokens must be >= 1, got 0"),  # was about skip_first
    ({"sample_top_k": 0}, "sdft.sample_top_k must be >= 1, got 0"),  # was "top_k", another sdft key
    ({"sample_top_p": 0.0}, "sdft.sample_top_p must be in (0, 1], got 0.0"),
])
def test_a_bad_sampling_setting_names_its_sdft_key(setting, message):
    with pytest.raises(LLMKitError, match=f"^{re.escape(message)}$"):
        SDFTConfig(**setting)


def test_skip_first_must_leave_a_completion_token_to_learn_from():
    from llmkit.modules.sdft import SDFTConfig

    with pytest.raises(LLMKitError, match=r"sdft.skip_first must be >= 0 and below sdft.max_new_tokens \(3\), got 3"):
        SDFTConfig(max_new_tokens=3, skip_first=3)  # no token left: every step skipped, max_steps never reached
    assert SDFTConfig(max_new_tokens=3, skip_first=2).skip_first == 2


@pytest.mark.parametrize("evaluation, message", [
    ({"probes": "missing_probes.jsonl"}, "probe file missing_probes.jsonl does not exist"),
    ({"ppl_files": ["missing_val.bin"]}, "evaluation.ppl_files: 'missing_val.bin' matches no file"),
])
def test_a_bad_evaluation_file_stops_the_run_before_its_first_step(evaluation, message, base_ckpt, tokenizer_path,
                                                                   examples):
    """Not at the first validation, after every step up to it has run."""
    module = SFTModule(str(base_ckpt), str(tokenizer_path), evaluation=evaluation)
    run = trainer(3, val_check_interval=2)
    with pytest.raises(LLMKitError, match=message):
        run.fit(module, SDFTDataModule(str(examples), batch_size=4, val_files=str(examples)))
    assert run.global_step == 0


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """The ``tag`` curve of the TensorBoard run ``run_dir``, as TensorBoard shows it (a resume's purge applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.mark.parametrize("command", ["sft", "sdft"])
def test_a_fine_tuning_run_with_accumulation_logs_each_optimizer_step_once_at_its_step(
        command, base_ckpt, tokenizer_path, examples, tmp_path):
    """As pretraining under Lightning's accumulation does: step k's train points, and the validation after it, at
    k - 1. They were logged per micro-batch (3 steps of 2: points 1-5), and every micro-batch that ended no step
    logged the last step's values again; then (a first fix) the values callbacks log, Replay at each
    micro-batch's start, one at its end, were logged twice a step."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from llmkit.callbacks import Replay

    class LogsAtBatchEnd(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            pl_module.log("batch_end", float(batch_idx), on_step=True, on_epoch=True, batch_size=len(batch))

    common = {"accumulate_grad_batches": 2, "optim": {"lr": 1e-3, "warmup_steps": 1}}
    module = sdft(base_ckpt, tokenizer_path, **common) if command == "sdft" else \
        SFTModule(str(base_ckpt), str(tokenizer_path), **common)
    logger = TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    L.Trainer(accelerator="cpu", max_steps=3, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, val_check_interval=2,
              limit_val_batches=1, callbacks=[Replay(replay_ratio=0.5), LogsAtBatchEnd()],
              ).fit(module, SDFTDataModule(str(examples), val_files=str(examples), batch_size=2))
    tags = [f"train/{module.loss_name}", "train/lr", f"val/{module.loss_name}", "train/replay_buffer", "batch_end_step"]
    tags += ["train/gen_len_mean"] if command == "sdft" else []
    for tag in tags:
        steps = [step for step, _ in scalars(tmp_path / "run" / "version_0", tag)]
        assert steps == [0, 1, 2], tag
    assert [v for _, v in scalars(tmp_path / "run" / "version_0", "train/replay_buffer")] == [4, 8, 12]  # at the
    # steps' second micro-batches (2 examples each), as Lightning logs a step's values
    assert [v for _, v in scalars(tmp_path / "run" / "version_0", "batch_end_step")] == [1, 3, 5]
    assert [v for _, v in scalars(tmp_path / "run" / "version_0", "batch_end_epoch")] == [2.5]  # every micro-batch's


@pytest.mark.parametrize("accumulate", [3, 1])
def test_a_fine_tuning_run_resumed_with_another_accumulation_steps_where_lightning_counts_a_step_end(
        accumulate, base_ckpt, tokenizer_path, examples, tmp_path):
    """Resumed after 4 batches of 2 a step with 3 a step, the accumulator counted 3 from the resume (a step at batch
    7) and Lightning from the epoch's start (one at batch 6): its validation there wiped the step's gradients."""
    from llmkit.callbacks import Checkpoint

    seen = []

    class CheckTheWindow(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            seen.append(pl_module.accumulator.in_window)
            assert pl_module.accumulator.in_window == trainer.fit_loop._should_accumulate()

        def on_validation_start(self, trainer, pl_module) -> None:
            assert pl_module.accumulator.in_window == any(p.grad is not None for p in pl_module.parameters())

    def fit(k: int, max_steps: int, ckpt_path: Path | None = None) -> None:
        module = SFTModule(str(base_ckpt), str(tokenizer_path), accumulate_grad_batches=k,
                           optim={"lr": 1e-3, "warmup_steps": 1})
        L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0, val_check_interval=6,
                  check_val_every_n_epoch=None, limit_val_batches=1,
                  callbacks=[CheckTheWindow(), Checkpoint(dirpath=tmp_path, every_n_train_steps=100)],
                  ).fit(module, SDFTDataModule(str(examples), val_files=str(examples), batch_size=2),
                        ckpt_path=ckpt_path)

    fit(2, 2)
    fit(accumulate, 4, tmp_path / "last.ckpt")
    assert seen[4:] == ([True, False, True, False] if accumulate == 3 else [False, False])  # batches 4-7 (the epoch's
    # last ends a step), 4-5


def test_a_fine_tuning_fit_that_fails_leaves_the_trainer_fit_for_another(base_ckpt, tokenizer_path, examples,
                                                                         monkeypatch):
    """The accumulation set for the fit stayed on the Trainer: its next fit of a module that optimises by hand was
    refused (Lightning: "Automatic gradient accumulation is not supported for manual optimization")."""
    run = trainer(2)
    data = SDFTDataModule(str(examples), batch_size=2)
    with monkeypatch.context() as patch:
        patch.setattr(SFTModule, "loss_sum", lambda *args: (torch.tensor(math.nan), 1))
        with pytest.raises(LLMKitError, match="non-finite training loss"):
            run.fit(SFTModule(str(base_ckpt), str(tokenizer_path), accumulate_grad_batches=2), data)
    assert run.accumulate_grad_batches == 1
    run.fit(SFTModule(str(base_ckpt), str(tokenizer_path), optim={"lr": 1e-3, "warmup_steps": 1}), data)
    assert run.global_step == 2


def test_the_schedule_of_a_fine_tuning_run_with_accumulation_counts_optimizer_steps(base_ckpt, tokenizer_path,
                                                                                    examples):
    """max_epochs without max_steps: 16 examples in micro-batches of 2 are 8 batches, 4 optimizer steps at 2 a step,
    and the cosine ends at the fourth (Lightning's estimate, not told the accumulation, counts the 8 batches)."""
    module = SFTModule(str(base_ckpt), str(tokenizer_path), accumulate_grad_batches=2,
                       optim={"lr": 1e-3, "warmup_steps": 1, "min_lr_ratio": 0.1})
    trainer(-1, max_epochs=1, limit_val_batches=0).fit(module, SDFTDataModule(str(examples), batch_size=2))
    assert module.global_step == 4
    decay = module.lr_schedulers().lr_lambdas[0]
    assert decay(4) == pytest.approx(0.1) and decay(3) > 0.1


def test_a_fine_tuning_run_with_accumulation_resumed_from_an_earlier_checkpoint_keeps_its_curves(
        base_ckpt, tokenizer_path, examples, shards, tmp_path):
    """The resume hides TensorBoard's points after the checkpoint's step (they are trained again). A run that
    logged per micro-batch had logged step 2 past it (at 3), and its point was lost."""
    config = yaml.safe_load(write_cli_config(tmp_path, base_ckpt, tokenizer_path, examples, shards, "sft").read_text())
    config["trainer"] |= {"max_steps": 4, "limit_val_batches": 0,
                          "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                     "init_args": {"save_dir": str(tmp_path / "tb"), "name": "run",
                                                   "default_hp_metric": False}}}
    config["trainer"]["callbacks"] = [{"class_path": "llmkit.callbacks.Checkpoint",
                                       "init_args": {"every_n_train_steps": 2, "save_top_k": -1}}]
    config["model"] |= {"accumulate_grad_batches": 2}
    config["data"]["batch_size"] = 2
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["sft", "fit", "--config", str(path)]) == 0
    run = tmp_path / "tb" / "run" / "version_0"
    straight = scalars(run, "train/loss")
    assert [step for step, _ in straight] == [0, 1, 2, 3]
    earlier = run / "checkpoints" / "epoch=0-step=2.ckpt"
    assert main(["sft", "fit", "--config", str(path), "--ckpt_path", str(earlier)]) == 0
    assert scalars(run, "train/loss") == [*straight[:3], *straight[2:]]  # step 3's first point stays beside the
    # resume's (docs/checkpoints.md)


@pytest.mark.parametrize("interrupt", ["CtrlCBeforeBatch3", "CtrlCAfterTheBackwardOfBatch2", "right after update 2"])
def test_a_fine_tuning_run_with_accumulation_resumed_after_ctrl_c_continues_its_curves(
        interrupt, base_ckpt, tokenizer_path, examples, shards, tmp_path, monkeypatch, ctrl_c):
    """Through the CLI, 2 micro-batches a step, validating every 3 batches: interrupted between the micro-batches
    of step 2 after the validation inside it, inside its first micro-batch (the interrupt lands at its end, before
    the validation), or right after its update, and resumed from last.ckpt, the run's curves and weights are those
    of the uninterrupted run."""
    configs = {}
    for name in ("straight", "interrupted"):
        (tmp_path / name).mkdir()
        config = yaml.safe_load(write_cli_config(tmp_path / name, base_ckpt, tokenizer_path, examples, shards,
                                                 "sft").read_text())
        config["trainer"] |= {"max_steps": 4, "val_check_interval": 3, "check_val_every_n_epoch": None,
                              "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                         "init_args": {"save_dir": str(tmp_path / name / "tb"), "name": "run",
                                                       "default_hp_metric": False}},
                              "callbacks": [{"class_path": "llmkit.callbacks.Checkpoint",
                                             "init_args": {"every_n_train_steps": 100}}]}
        config["model"] |= {"accumulate_grad_batches": 2}
        config["data"]["batch_size"] = 2
        configs[name] = tmp_path / name / "sft.yaml"
        configs[name].write_text(yaml.safe_dump(config))
    assert main(["sft", "fit", "--config", str(configs["straight"])]) == 0
    extra = [f"--trainer.callbacks+=tests.test_sdft.{interrupt}"] if interrupt.startswith("CtrlC") else []
    if not extra:
        ctrl_c_right_after_update(monkeypatch, step=2)
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown after Ctrl-C
        main(["sft", "fit", "--config", str(configs["interrupted"]), *extra])
    monkeypatch.undo()
    run, straight = (tmp_path / name / "tb" / "run" / "version_0" for name in ("interrupted", "straight"))
    assert main(["sft", "fit", "--config", str(configs["interrupted"]), "--ckpt_path",
                 str(run / "checkpoints" / "last.ckpt")]) == 0
    for tag in ("train/loss", "train/lr", "train/tokens_per_step", "val/loss", "val/ppl"):
        assert scalars(run, tag) == scalars(straight, tag), tag
    saved = [torch.load(r / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for r in (run, straight)]
    torch.testing.assert_close(saved[0], saved[1], rtol=0, atol=0)


def test_the_trainers_accumulation_on_a_fine_tuning_run_points_to_the_modules(base_ckpt, tokenizer_path, examples,
                                                                              shards, tmp_path, capsys):
    config = write_cli_config(tmp_path, base_ckpt, tokenizer_path, examples, shards, "sft")
    assert main(["sft", "fit", "--config", str(config), "--trainer.accumulate_grad_batches", "2"]) == 1
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("llmkit: error: trainer: Automatic gradient accumulation is not supported for manual")
    assert last.endswith("(this module optimises by hand: set model.gradient_clip_val (and, for sft and sdft, "
                         "model.accumulate_grad_batches) instead)")
