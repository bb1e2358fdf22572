"""Evaluation: perplexity on the fixed validation windows, greedy probes, the JSON report."""

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmkit.data.packing import open_shard
from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import LLMKitError
from llmkit.eval import EvalConfig, Probe, evaluate, evaluate_perplexity, read_probes, score_probes
from llmkit.io import write_json_atomic
from llmkit.model.config import ModelConfig
from llmkit.model.generation import SamplingConfig, generate
from llmkit.model.transformer import Transformer
from tests.conftest import VOCAB_SIZE

PROMPT = "def alpha_0(beta, alpha=None):\n"


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=VOCAB_SIZE, n_layers=1, d_model=32, n_heads=4, d_ff=64, max_seq_len=64,
                                   n_streams=2))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path) -> Tokenizer:
    return Tokenizer(tokenizer_path)


def test_perplexity_equals_cross_entropy_over_the_fixed_windows(model, shards):
    result = evaluate_perplexity(model, [str(shards["val"])], seq_len=32, batch_size=2, max_windows=5)
    tokens, _ = open_shard(shards["val"])
    windows = torch.from_numpy(np.stack([tokens[k * 32 : k * 32 + 33] for k in range(5)]).astype(np.int64))
    with torch.no_grad():
        logits = model(windows[:, :-1])
    expected = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), windows[:, 1:].reshape(-1)).item()
    assert result["loss"] == pytest.approx(expected, rel=1e-6)
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    assert result["bits_per_token"] == pytest.approx(result["loss"] / math.log(2), rel=1e-12)
    assert (result["tokens"], result["windows"], result["seq_len"]) == (160, 5, 32)
    assert result["files"] == [str(shards["val"])]
    assert 4.0 < result["loss"] < 8.0  # a random model sits near ln(384) = 5.95


def test_evaluation_runs_in_eval_mode_and_restores_training_mode(model, shards, tokenizer):
    seen = []
    hook = model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    model.train()
    model.blocks[0].eval()  # a submodule in a mode of its own keeps it
    try:
        evaluate_perplexity(model, str(shards["val"]), seq_len=32, max_windows=2)
        score_probes(model, tokenizer, [Probe("p", PROMPT, expect_substring="x")], max_new_tokens=2)
    finally:
        hook.remove()
    assert seen and not any(seen)
    assert model.training and not model.blocks[0].training and model.lm_head.training
    model.eval()


def test_perplexity_refuses_a_window_longer_than_the_context(model, shards):
    with pytest.raises(LLMKitError, match="seq_len 65 exceeds the model's max_seq_len 64"):
        evaluate_perplexity(model, [str(shards["val"])], seq_len=65)
    with pytest.raises(LLMKitError, match="no perplexity shards"):
        evaluate_perplexity(model, [], seq_len=32)


def greedy_completion(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    out = generate(model.eval(), [tokenizer.encode(prompt)], SamplingConfig(max_new_tokens=max_new_tokens,
                   temperature=0), eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    return tokenizer.decode(out.tokens[0][out.mask[0]].tolist())


def test_probes_score_the_greedy_completion(model, tokenizer):
    completion = greedy_completion(model, tokenizer, PROMPT, 8)
    assert len(completion) >= 3
    probes = [Probe("passes", PROMPT, expect_substring=completion[:3]), Probe("fails", PROMPT, expect_regex="(?!)")]
    scores = score_probes(model, tokenizer, probes, max_new_tokens=8, batch_size=1)
    assert (scores["accuracy"], scores["passed"], scores["n"], scores["max_new_tokens"]) == (0.5, 1, 2, 8)
    assert scores["results"] == [
        {"name": "passes", "prompt": PROMPT, "completion": completion, "passed": True},
        {"name": "fails", "prompt": PROMPT, "completion": completion, "passed": False},
    ]


def test_probe_completions_are_capped_to_the_context_and_long_prompts_refused(model, tokenizer):
    prompt = "alpha " * 200
    n = len(tokenizer.encode(prompt[:200]))
    assert n < 64
    scores = score_probes(model, tokenizer, [Probe("long", prompt[:200], expect_regex=".")], max_new_tokens=100)
    assert scores["max_new_tokens"] == 64 - n
    with pytest.raises(LLMKitError, match="probe 'too long': its prompt is"):
        score_probes(model, tokenizer, [Probe("too long", prompt, expect_regex=".")])
    with pytest.raises(LLMKitError, match="^probes.jsonl:3: probe 'too long': its prompt is"):  # read from a file
        score_probes(model, tokenizer, [Probe("too long", prompt, expect_regex=".", source="probes.jsonl:3")])


def test_a_probe_needs_exactly_one_valid_expectation():
    with pytest.raises(LLMKitError, match="exactly one of"):
        Probe("both", "p", expect_regex="a", expect_substring="a")
    with pytest.raises(LLMKitError, match="exactly one of"):
        Probe("neither", "p")
    with pytest.raises(LLMKitError, match="probe 'bad': expect_regex '\\(' is not a valid"):
        Probe("bad", "p", expect_regex="(")
    assert Probe("r", "p", expect_regex=r"\b82\b").passes("= 82.")
    assert not Probe("s", "p", expect_substring="x").passes("")


@pytest.mark.parametrize(
    "line, message",
    [('{"name": "b", "prompt": "p", "expect_regex": "("}', "probe 'b': expect_regex '(' is not a valid"),
     ('{"name": "b", "prompt": "p"}', "exactly one of expect_regex and expect_substring"),
     ('{"name": "b", "prompt": "p", "expect_regexp": "x"}', "unknown fields ['expect_regexp']"),
     ('{"name": "a", "prompt": "p", "expect_substring": "x"}', "probe name 'a' is already used at"),
     ('{"name": "b", "prompt": ["p"], "expect_substring": "x"}', "'prompt' is an array"),
     ('{"name": "b"', "not valid JSON"),
     ('{"name": "b", "prompt": "p", "expect_substring": "x", "prompt": "q"}', "the key 'prompt' is given twice")],
)
def test_read_probes_reports_file_and_line(tmp_path, line, message):
    path = tmp_path / "probes.jsonl"
    path.write_text('{"name": "a", "prompt": "p", "expect_substring": "x"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(LLMKitError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(message)):
        read_probes(path)


def test_read_probes_reads_both_expectations_and_refuses_an_empty_file(tmp_path):
    path = tmp_path / "probes.jsonl"
    path.write_text('{"name": "a", "prompt": "p", "expect_substring": "x"}\n'
                    '{"name": "b", "prompt": "q", "expect_regex": "y+"}\n', encoding="utf-8")
    assert read_probes(path) == [Probe("a", "p", expect_substring="x"), Probe("b", "q", expect_regex="y+")]
    assert [p.source for p in read_probes(path)] == [f"{path}:1", f"{path}:2"]
    path.write_text("\n")
    with pytest.raises(LLMKitError, match=re.escape(f"{path} has no probes")):
        read_probes(path)


def test_report_combines_both_sections_and_is_written_atomically(model, tokenizer, shards, tmp_path):
    probes = [Probe("p", PROMPT, expect_regex="(?!)")]
    report = evaluate(model, tokenizer, [str(shards["val"])], probes, seq_len=32, max_windows=3, max_new_tokens=4)
    assert report["perplexity"] == evaluate_perplexity(model, [str(shards["val"])], seq_len=32, max_windows=3)
    assert report["probes"]["n"] == 1 and report["probes"]["accuracy"] == 0.0
    path = tmp_path / "run" / "eval_after.json"
    write_json_atomic(path, report)
    assert json.loads(path.read_text()) == report
    assert [p.name for p in path.parent.iterdir()] == ["eval_after.json"]
    assert evaluate(model, None, [str(shards["val"])], None, seq_len=32, max_windows=1)["probes"] is None
    with pytest.raises(LLMKitError, match="nothing to evaluate"):
        evaluate(model, tokenizer, None, None, seq_len=32)
    with pytest.raises(LLMKitError, match="probes need the model's tokenizer"):
        evaluate(model, None, None, probes)


def test_shards_of_another_tokenizer_of_the_same_size_are_refused(model, tokenizer, shards, corpus_dir, tmp_path):
    """Only the size was checked: a model scored on shards of another tokenizer reported a perplexity of ids
    that mean other text (1223 where its own shards gave 174)."""
    from llmkit.data.tokenizer import TokenizerTrainConfig, train_tokenizer

    config = TokenizerTrainConfig(vocab_size=VOCAB_SIZE, normalization="identity", keep_whitespace=False)
    other = Tokenizer(train_tokenizer([corpus_dir / "train.txt"], tmp_path / "other", config))
    assert other.vocab_size == tokenizer.vocab_size and other.sha256 != tokenizer.sha256
    files = [str(shards["val"])]
    with pytest.raises(LLMKitError, match=re.escape(f"{shards['val']} was packed with another tokenizer")):
        evaluate(model, other, files, None, seq_len=32, max_windows=1)
    assert evaluate(model, tokenizer, files, None, seq_len=32, max_windows=1)["perplexity"]["windows"] == 1


def test_an_eval_config_takes_one_probe_file():
    """A list (as ppl_files takes) is refused when built, not deep in the first evaluation."""
    with pytest.raises(LLMKitError, match=r"evaluation.max_windows 0, probe_batch_size -1: these must be >= 1"):
        EvalConfig(max_windows=0, probe_batch_size=-1)  # a ZeroDivisionError after the first steps, or a range()
    with pytest.raises(LLMKitError, match=r"evaluation.probes takes one probe JSONL file, got \['a.jsonl'\]"):
        EvalConfig(probes=["a.jsonl"])
    assert EvalConfig(probes="a.jsonl", ppl_files="v.bin").ppl_files == ["v.bin"]


def test_evaluate_defaults_to_the_eval_config_settings():
    """evaluate() declared max_windows 256 beside EvalConfig's 64: the two defaults had drifted."""
    import dataclasses
    import inspect

    defaults = {name: p.default for name, p in inspect.signature(evaluate).parameters.items()}
    shared = {f.name: f.default for f in dataclasses.fields(EvalConfig)
              if f.name in defaults and f.name not in ("ppl_files", "probes")}  # evaluate's inputs
    assert set(shared) == {"seq_len", "batch_size", "max_windows", "max_new_tokens", "probe_batch_size"}
    assert {name: defaults[name] for name in shared} == shared
