"""Callbacks declare what they need from the LightningModule and refuse, at setup, one that lacks it."""

import lightning as L
import pytest
import torch

from llmkit.callbacks import EMATeacher, MHCMonitor, RegressionGate
from llmkit.callbacks.interfaces import HasBackbone, HasEvaluation, HasTeacher, HasTokenizer, satisfies
from llmkit.data.datamodule import PackedDataModule
from llmkit.errors import LLMKitError
from llmkit.eval import EvalConfig
from llmkit.model.config import ModelConfig
from llmkit.modules.pretrain import PretrainModule
from llmkit.modules.sdft import SDFTModule
from llmkit.modules.sft import SFTModule
from llmkit.modules.ttt_discover import TTTDiscoverModule
from tests.conftest import VOCAB_SIZE

CONFIG = ModelConfig(vocab_size=VOCAB_SIZE, n_layers=1, d_model=32, n_heads=4, d_ff=64, max_seq_len=64, n_streams=2)


class LinearModule(L.LightningModule):
    """A module whose ``model`` is not an llmkit Transformer."""

    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Linear(4, 4)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(batch[0][:, :4].float()).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=0.1)


def fit(module: L.LightningModule, callback: L.Callback, shards) -> None:
    data = PackedDataModule(train_files=[str(shards["train"])], seq_len=32, batch_size=2, vocab_size=VOCAB_SIZE)
    L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[callback]).fit(module, datamodule=data)


@pytest.mark.parametrize("module, callback, message", [
    (lambda: PretrainModule(CONFIG), lambda: EMATeacher(),
     r"EMATeacher needs the LightningModule to have `teacher` \(Module; it has none\) \(use it with SDFTModule\); "
     r"PretrainModule does not \(HasTeacher: "),
    (LinearModule, MHCMonitor,
     r"MHCMonitor needs the LightningModule to have `model` \(Transformer; it has Linear\) .*; LinearModule does not"),
    (LinearModule, lambda: RegressionGate(evaluation=EvalConfig(ppl_files=["x.bin"])),
     r"RegressionGate needs the LightningModule to have `model` \(Transformer; it has Linear\)"),
])
def test_a_callback_names_itself_the_module_and_the_missing_piece_before_training(module, callback, message, shards):
    module = module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(LLMKitError, match=message):
        fit(module, callback(), shards)
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())  # no step was taken


def test_llmkit_modules_satisfy_the_protocols_their_callbacks_need(tokenizer_path, tmp_path):
    pretrain = PretrainModule(CONFIG)
    assert satisfies(pretrain, HasBackbone)
    assert not any(satisfies(pretrain, p) for p in (HasTeacher, HasTokenizer, HasEvaluation))
    ckpt = tmp_path / "base.ckpt"
    pretrain.configure_model()
    torch.save({"state_dict": pretrain.state_dict(), "hyper_parameters": {"config": CONFIG.to_dict()}}, ckpt)
    common = {"init_ckpt": str(ckpt), "tokenizer": str(tokenizer_path)}
    sdft, sft = SDFTModule(**common), SFTModule(**common)
    assert all(satisfies(sdft, p) for p in (HasBackbone, HasTeacher, HasEvaluation, HasTokenizer))
    assert all(satisfies(sft, p) for p in (HasBackbone, HasEvaluation, HasTokenizer))
    assert not satisfies(sft, HasTeacher)
    ttt = TTTDiscoverModule(**common, lora={"rank": 2, "alpha": 4.0})
    assert satisfies(ttt, HasBackbone) and satisfies(ttt, HasTokenizer)


def test_a_callback_or_module_given_the_other_kind_of_batch_says_which_it_needs(shards, tokenizer_path, tmp_path):
    """Token windows (pretraining) and prompt/demonstration examples (SFT, SDFT) do not mix: one line
    naming what is needed, not an AttributeError mid-step."""
    from llmkit.callbacks import Replay
    from llmkit.callbacks.throughput import batch_tokens
    from llmkit.data.sdft_data import SDFTDataModule
    from llmkit.data.tasks import write_task_files

    with pytest.raises(LLMKitError, match=r"^Replay needs batches that are lists of Example \(SDFTDataModule's, in "
                                          r"SFTModule and SDFTModule runs\), got a list of Tensor$"):
        fit(PretrainModule(CONFIG), Replay(buffer_size=4), shards)
    with pytest.raises(LLMKitError, match=r"^TokenThroughput counts \(x, y\) batches of token windows .* got a list "
                                          r"of str$"):
        batch_tokens(["an example"])
    examples = tmp_path / "ex.jsonl"
    write_task_files("arithmetic", 4, seed=0, out=examples)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(LLMKitError, match=r"^PretrainModule trains on token windows \(PackedDataModule\), not "
                                          r"SDFTDataModule's examples"):
        trainer.fit(PretrainModule(CONFIG), SDFTDataModule(str(examples)))
    pretrain = PretrainModule(CONFIG)
    pretrain.configure_model()
    torch.save({"state_dict": pretrain.state_dict(), "hyper_parameters": {"config": CONFIG.to_dict()}},
               tmp_path / "base.ckpt")
    sft = SFTModule(init_ckpt=str(tmp_path / "base.ckpt"), tokenizer=str(tokenizer_path))
    with pytest.raises(LLMKitError, match=r"^SFTModule trains on prompt/demonstration examples \(SDFTDataModule\), "
                                          r"not PackedDataModule's token windows"):
        trainer.fit(sft, PackedDataModule(train_files=[str(shards["train"])], seq_len=32, batch_size=2))


def test_settings_that_cannot_work_are_refused_when_given():
    from llmkit.optim import OptimConfig

    with pytest.raises(LLMKitError, match=r"^MHCMonitor every_n_steps and max_tokens must be >= 1, got 0 and 64$"):
        MHCMonitor(every_n_steps=0)
    with pytest.raises(LLMKitError, match=r"^RegressionGate max_ppl_increase must be a number >= 0 and max_probe_drop"):
        RegressionGate(max_ppl_increase=-1)
    with pytest.raises(LLMKitError, match=r"^optim.lr must be >= 0, got -1"):
        OptimConfig(lr=-1)
    with pytest.raises(LLMKitError, match=r"^optim.min_lr_ratio must be in \[0, 1\], got 2"):
        OptimConfig(min_lr_ratio=2)
