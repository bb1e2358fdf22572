"""Hugging Face interop: tiny random Llama / Mistral / Qwen2 / Qwen3 models built here with
transformers (a test-only dependency), imported, compared with transformers' own forward and
greedy decoding, upcycled to mHC, exported back; bad model directories."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from llmkit.cli import main
from llmkit.data.tokenizer import tokenizer_record
from llmkit.errors import LLMKitError
from llmkit.model.checkpoint import TOKENIZER_KEY, load_backbone, read_checkpoint
from llmkit.model.config import ModelConfig
from llmkit.model.generation import SamplingConfig, generate
from llmkit.model.hf import read_hf_model
from llmkit.model.lora import LoRAConfig, apply_lora, base_fingerprint, save_lora
from llmkit.model.transformer import Transformer
from tests.conftest import VOCAB_SIZE, dead_pid

transformers = pytest.importorskip("transformers")

VOCAB = 160
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=96, rms_norm_eps=1e-6)
FAMILIES = {
    # Llama 3.1's rope scaling, with an original context shorter than the test's sequences
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),  # TinyLlama/SmolLM-like
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=4096)),  # a window past the context
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24)),  # head_dim != hidden / heads
}
EXPORTED_AS = {"llama3": "llama", "llama_tied": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def build_hf_model(family: str, root: Path, seed: int = 0):
    """A tiny random model of ``family`` saved into ``root/family``; every weight (norm gains and
    biases too) perturbed so that a wrong mapping cannot pass."""
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**COMMON, **extra)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.08)
    model.save_pretrained(root / family)
    return model, root / family


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {family: build_hf_model(family, root) for family in FAMILIES}


@pytest.fixture(scope="module")
def converted(hf_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    paths = {}
    for family, (_, model_dir) in hf_models.items():
        paths[family] = out / f"{family}.ckpt"
        assert main(["convert", "from-hf", "--model-dir", str(model_dir), "--out", str(paths[family])]) == 0
    return paths


def tokens(batch: int = 3, length: int = 80, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_logits_equal_transformers(family, hf_models, converted):
    hf_model, _ = hf_models[family]
    model = load_backbone(converted[family])
    x = tokens()
    with torch.no_grad():
        expected, got = hf_model(x).logits, model(x)
    assert expected.abs().max() > 0.5  # logits of a size where a wrong weight shows
    assert (expected - got).abs().max().item() <= 1e-4
    config = model.config
    assert (config.attention_bias, config.qk_norm) == (family == "qwen2", family == "qwen3")
    assert config.tie_embeddings == (family in ("llama_tied", "qwen2"))
    assert (config.rope_scaling is not None) == (family == "llama3")
    if config.tie_embeddings:
        assert model.lm_head.weight is model.tok_emb.weight


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_equals_transformers_token_for_token(family, hf_models, converted):
    hf_model, _ = hf_models[family]
    model = load_backbone(converted[family])
    prompts = tokens(batch=2, length=12, seed=2)
    with torch.no_grad():
        expected = hf_model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                     max_new_tokens=10, min_new_tokens=10, eos_token_id=None, pad_token_id=0)
    result = generate(model, prompts.tolist(), SamplingConfig(max_new_tokens=10, temperature=0.0), eos_id=None)
    assert result.tokens.tolist() == expected[:, 12:].tolist()


def test_a_model_directory_reads_like_its_converted_checkpoint(hf_models, converted):
    _, model_dir = hf_models["qwen3"]
    x = tokens()
    with torch.no_grad():
        assert torch.equal(load_backbone(model_dir)(x), load_backbone(converted["qwen3"])(x))


def test_dtype_auto_keeps_the_source_dtype_and_bf16_halves_it(hf_models, tmp_path):
    _, model_dir = hf_models["llama3"]
    assert main(["convert", "from-hf", "--model-dir", str(model_dir), "--out", str(tmp_path / "bf16.ckpt"),
                 "--dtype", "bf16", "--max-seq-len", "64"]) == 0
    ckpt = read_checkpoint(tmp_path / "bf16.ckpt")
    assert {t.dtype for t in ckpt["state_dict"].values()} == {torch.bfloat16}
    assert ckpt["model_config"]["max_seq_len"] == 64 and ckpt["converted_from"]["model_type"] == "llama"
    config, state = read_hf_model(model_dir)
    assert {t.dtype for t in state.values()} == {torch.float32}


@pytest.mark.parametrize(("flags", "message"), [
    (["--max-seq-len", "0"], "--max-seq-len 0: must be 1 or more (leave it out for the model's context)"),
    (["--n-streams", "0"], "--n-streams 0: 1 keeps the dense residual, 2 or more upcycles to mHC"),
])
def test_from_hf_refuses_a_context_or_stream_count_below_one(flags, message, hf_models, tmp_path, capsys):
    """--max-seq-len 0 meant "no cap" without a word."""
    assert main(["convert", "from-hf", "--model-dir", str(hf_models["llama3"][1]), "--out", str(tmp_path / "o.ckpt"),
                 *flags]) == 1
    assert capsys.readouterr().err == f"llmkit: error: {message}\n" and not (tmp_path / "o.ckpt").exists()


def test_from_hf_says_when_max_seq_len_is_beyond_the_models_context(hf_models, tmp_path, capsys):
    assert main(["convert", "from-hf", "--model-dir", str(hf_models["llama3"][1]), "--out", str(tmp_path / "o.ckpt"),
                 "--max-seq-len", "1000"]) == 0
    assert read_checkpoint(tmp_path / "o.ckpt")["model_config"]["max_seq_len"] == 96
    assert "--max-seq-len 1000 is beyond the model's max_position_embeddings; the context stays 96" in \
        capsys.readouterr().err


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3"])
def test_upcycled_mhc_model_computes_the_dense_logits(family, hf_models, converted, tmp_path):
    out = tmp_path / "n4.ckpt"
    assert main(["convert", "from-hf", "--model-dir", str(hf_models[family][1]), "--out", str(out),
                 "--n-streams", "4"]) == 0
    dense, mhc = load_backbone(converted[family]), load_backbone(out)
    assert mhc.config.n_streams == 4 and mhc.config.mhc.post_init == "copy"
    x = tokens()
    with torch.no_grad():
        assert (dense(x) - mhc(x)).abs().max().item() <= 1e-5
        # exact in the math, up to Sinkhorn's eps (1e-8) and float rounding: fp64 shows it
        assert (dense.double()(x) - mhc.double()(x)).abs().max().item() <= 1e-6
    # the streams differ (a zero-mean stream embedding), so training can pull them apart
    assert mhc.stream_emb.abs().min() > 0 and mhc.stream_emb.sum(0).abs().max() < 1e-6
    mhc.float().train()
    mhc.loss(x[:, :-1], x[:, 1:]).backward()
    assert mhc.blocks[0].attn_res.mapping.phi.weight.grad.abs().sum() > 0


def test_upcycle_command_turns_any_dense_checkpoint_into_mhc(converted, tmp_path):
    assert main(["convert", "upcycle", "--ckpt", str(converted["llama_tied"]), "--out", str(tmp_path / "u.ckpt"),
                 "--n-streams", "2"]) == 0
    x = tokens()
    with torch.no_grad():
        assert (load_backbone(converted["llama_tied"])(x) - load_backbone(tmp_path / "u.ckpt")(x)).abs().max() <= 1e-5
    assert main(["convert", "upcycle", "--ckpt", str(tmp_path / "u.ckpt"), "--out", str(tmp_path / "uu.ckpt")]) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trip_loads_in_transformers_with_equal_logits(family, hf_models, converted, tmp_path):
    hf_model, _ = hf_models[family]
    out = tmp_path / "export"
    assert main(["convert", "to-hf", "--ckpt", str(converted[family]), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == EXPORTED_AS[family]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = tokens()
    with torch.no_grad():
        assert (hf_model(x).logits - reloaded(x).logits).abs().max().item() <= 1e-4


def test_a_model_without_tokenizer_files_exports_its_special_ids_and_sampling_defaults(hf_models, converted, tmp_path):
    """With no tokenizer to read them from, the export wrote no *_token_id and an empty
    generation_config.json: transformers' generate then never stopped at EOS."""
    source = hf_models["llama3"][1]
    assert main(["convert", "to-hf", "--ckpt", str(converted["llama3"]), "--out", str(tmp_path / "out")]) == 0
    given, exported = (json.loads((d / "config.json").read_text()) for d in (source, tmp_path / "out"))
    assert (exported["bos_token_id"], exported["eos_token_id"]) == (given["bos_token_id"], given["eos_token_id"]) \
        == (1, 2)
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


@pytest.mark.parametrize("command", ["from-hf", "upcycle", "merge"])
def test_a_checkpoint_writer_never_replaces_an_existing_file(command, hf_models, converted, tmp_path, capsys):
    """from-hf, upcycle and lora merge replaced whatever --out named: a trained run's last.ckpt too."""
    out = tmp_path / "last.ckpt"
    out.write_bytes(b"a trained run's checkpoint")
    adapter = tmp_path / "adapter.safetensors"
    if command == "merge":
        adapted(converted["llama3"], adapter)
    args = {"from-hf": ["convert", "from-hf", "--model-dir", str(hf_models["llama3"][1])],
            "upcycle": ["convert", "upcycle", "--ckpt", str(converted["llama3"])],
            "merge": ["lora", "merge", "--ckpt", str(converted["llama3"]), "--lora", str(adapter)]}[command]
    assert main([*args, "--out", str(out)]) == 1
    assert capsys.readouterr().err.startswith(f"llmkit: error: --out {out} already exists: ")
    assert out.read_bytes() == b"a trained run's checkpoint"


def test_an_unused_qwen_sliding_window_imports_at_full_context(hf_models, tmp_path):
    """use_sliding_window with max_window_layers at the layer count windows no layer (transformers'
    layer_types are all full_attention); it was refused as a window shorter than the context."""
    model_dir = break_dir(hf_models, tmp_path, "qwen2")
    edit_config(model_dir, use_sliding_window=True, sliding_window=32, max_window_layers=2, layer_types=None)
    assert main(["convert", "from-hf", "--model-dir", str(model_dir), "--out", str(tmp_path / "a.ckpt")]) == 0
    assert read_checkpoint(tmp_path / "a.ckpt")["model_config"]["max_seq_len"] == 96
    edit_config(model_dir, max_window_layers=1)  # layer 1 attends over 32 tokens
    assert main(["convert", "from-hf", "--model-dir", str(model_dir), "--out", str(tmp_path / "b.ckpt")]) == 1
    edit_config(model_dir, layer_types=["full_attention", "full_attention"])  # where listed, layer_types decide
    assert main(["convert", "from-hf", "--model-dir", str(model_dir), "--out", str(tmp_path / "c.ckpt")]) == 0


def test_an_mhc_model_exports_as_an_llmkit_directory_that_llmkit_loads(hf_models, tmp_path):
    ckpt = tmp_path / "n4.ckpt"
    assert main(["convert", "from-hf", "--model-dir", str(hf_models["qwen3"][1]), "--out", str(ckpt),
                 "--n-streams", "4"]) == 0
    out = tmp_path / "export"
    assert main(["convert", "to-hf", "--ckpt", str(ckpt), "--out", str(out), "--dtype", "fp32"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "llmkit"
    x = tokens()
    with torch.no_grad():
        assert torch.equal(load_backbone(ckpt)(x), load_backbone(out)(x))


def test_a_sentencepiece_tokenizer_exports_so_that_transformers_encodes_as_llmkit(tokenizer_path, tmp_path):
    from llmkit.data.tokenizer import load_tokenizer

    config = ModelConfig(vocab_size=VOCAB_SIZE, n_layers=1, d_model=32, n_heads=4, d_ff=64, max_seq_len=64,
                         n_streams=1)
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in Transformer(config).state_dict().items()},
                "model_config": config.to_dict()}, ckpt)
    assert main(["convert", "to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "out"),
                 "--tokenizer", str(tokenizer_path)]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    ours = load_tokenizer(tokenizer_path)
    for text in ["def alpha_1(beta, alpha=None):\n    if alpha is None:\n        return [x]", "  two  spaces",
                 "digits 1234", "Ünïcode ✓ 日本", " lead"]:
        ids = ours.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False) == ids
        assert hf_tok.decode(ids, skip_special_tokens=True) == ours.decode(ids)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == ours.eos_id == 3


def adapted(ckpt: Path, path: Path) -> Transformer:
    """The backbone of ``ckpt`` with a LoRA adapter whose B is non-zero, saved to ``path``."""
    model = load_backbone(ckpt)
    config = LoRAConfig(rank=4, alpha=8.0, targets=["q_proj", "v_proj", "down_proj"])
    apply_lora(model, config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)
    save_lora(model, path, config, base_fingerprint(load_backbone(ckpt)))
    return model.eval()


def test_a_checkpoint_holding_its_adapter_upcycles_with_it_merged(converted, tmp_path, capsys):
    """A TTT-Discover checkpoint holds the base's weights and lora_A / lora_B: upcycle copied the adapter
    tensors into a checkpoint that no longer said how to merge them, and so could not be read."""
    model = adapted(converted["llama3"], tmp_path / "adapter.safetensors")
    checkpoint = read_checkpoint(converted["llama3"])

    def with_adapter(path: Path, rank: int) -> Path:
        lora = LoRAConfig(rank=rank, alpha=8.0, targets=["q_proj", "v_proj", "down_proj"]).to_dict()
        torch.save({**checkpoint, "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                    "hyper_parameters": {**checkpoint.get("hyper_parameters", {}), "lora": lora}}, path)
        return path

    ttt = with_adapter(tmp_path / "ttt.ckpt", 4)
    assert main(["convert", "upcycle", "--ckpt", str(ttt), "--out", str(tmp_path / "u.ckpt"), "--n-streams", "2"]) == 0
    x = tokens()
    with torch.no_grad():
        assert (model(x) - load_backbone(tmp_path / "u.ckpt")(x)).abs().max() <= 1e-5
    wrong = with_adapter(tmp_path / "wrong_rank.ckpt", 8)  # its config disagrees with its tensors
    with pytest.raises(LLMKitError, match=rf"{wrong}: blocks.0.attn.q_proj lacks its base weight or its lora_A / "
                                          r"lora_B of rank 8 \(the rank its adapter config gives\)"):
        load_backbone(wrong)


def test_lora_exports_merged_or_as_a_peft_adapter(converted, tmp_path):
    peft = pytest.importorskip("peft")
    model = adapted(converted["llama3"], tmp_path / "adapter.safetensors")
    x = tokens()
    with torch.no_grad():
        expected = model(x)
    merged, separate = tmp_path / "merged", tmp_path / "separate"
    assert main(["convert", "to-hf", "--ckpt", str(converted["llama3"]), "--out", str(merged),
                 "--lora", str(tmp_path / "adapter.safetensors")]) == 0
    assert main(["convert", "to-hf", "--ckpt", str(converted["llama3"]), "--out", str(separate),
                 "--lora", str(tmp_path / "adapter.safetensors"), "--no-merge-lora"]) == 0
    with torch.no_grad():
        got = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()(x).logits
        assert (expected - got).abs().max().item() <= 1e-4
        base = transformers.AutoModelForCausalLM.from_pretrained(separate).eval()
        assert (expected - base(x).logits).abs().max().item() > 1e-3  # the base alone differs
        with_adapter = peft.PeftModel.from_pretrained(base, separate / "adapter").eval()
        assert (expected - with_adapter(x).logits).abs().max().item() <= 1e-4


# --- bad input: one line, nothing written ---------------------------------------------------------

def break_dir(hf_models, tmp_path: Path, family: str = "llama3") -> Path:
    model_dir = tmp_path / "model"
    shutil.copytree(hf_models[family][1], model_dir)
    return model_dir


def edit_config(model_dir: Path, **changes) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))


def shard(model_dir: Path) -> None:
    """Split model.safetensors into two shards with an index, as large models come."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(model_dir / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, model_dir / file, metadata={"format": "pt"})
    (model_dir / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: file for file, keys in halves.items() for k in keys}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))


def test_sharded_weights_with_an_index_import_equally(hf_models, converted, tmp_path):
    model_dir = break_dir(hf_models, tmp_path)
    shard(model_dir)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(load_backbone(model_dir)(x), load_backbone(converted["llama3"])(x))


def test_a_stray_safetensors_file_beside_model_safetensors_is_not_read(hf_models, converted, tmp_path):
    """As transformers reads it; a zeroed copy beside it used to replace the weights (Mistral also ships a
    consolidated.safetensors in its own names)."""
    from safetensors.torch import load_file, save_file

    model_dir = break_dir(hf_models, tmp_path)
    zeros = {k: torch.zeros_like(t) for k, t in load_file(model_dir / "model.safetensors").items()}
    save_file(zeros, model_dir / "zz_old.safetensors", metadata={"format": "pt"})
    x = tokens()
    with torch.no_grad():
        assert torch.equal(load_backbone(model_dir)(x), load_backbone(converted["llama3"])(x))


def test_a_weights_file_given_as_a_checkpoint_points_to_its_model_directory(hf_models, capsys):
    """It said the file was a truncated checkpoint archive."""
    weights = hf_models["llama3"][1] / "model.safetensors"
    assert main(["generate", "--ckpt", str(weights), "--tokenizer", str(weights.parent), "--prompt", "x"]) == 1
    assert capsys.readouterr().err == (f"llmkit: error: {weights} is a weights file, not a checkpoint: give the model "
                                       f"directory it is in ({weights.parent}), which llmkit reads with its "
                                       "config.json, or a .ckpt\n")


def test_a_pickled_weights_file_and_a_peft_directory_say_what_they_are(hf_models, converted, tokenizer_path, tmp_path,
                                                                       capsys):
    """They said 'not an llmkit checkpoint (no model config or state_dict)' and 'does not exist'."""
    model_dir = break_dir(hf_models, tmp_path)
    (model_dir / "pytorch_model.bin").write_bytes(b"pickled")
    assert main(["generate", "--ckpt", str(model_dir / "pytorch_model.bin"), "--prompt", "x"]) == 1
    assert "is a Hugging Face weights file in pickle format, which llmkit does not load" in capsys.readouterr().err
    peft = tmp_path / "adapter"
    peft.mkdir()
    (peft / "adapter_config.json").write_text("{}")
    assert main(["generate", "--ckpt", str(converted["llama3"]), "--lora", str(peft),
                 "--tokenizer", str(tokenizer_path), "--prompt", "x"]) == 1
    assert f"LoRA adapter {peft} is a directory (a PEFT adapter directory, which llmkit writes but does not read)" \
        in capsys.readouterr().err


@pytest.mark.parametrize(("damage", "message"), [
    (lambda ckpt: ckpt["model_config"].update(d_model=128),  # a traceback of 60 size-mismatch lines
     "weights do not match its config (lm_head.weight has shape [160, 64] where its config makes [160, 128], and 20 "
     "more)"),
    (lambda ckpt: ckpt["state_dict"]["model.blocks.0.mlp.up_proj.weight"].fill_(math.nan),  # sampled nothing, rc 0
     "blocks.0.mlp.up_proj.weight holds NaN or infinite values; the file is damaged or its run diverged: use an "
     "earlier checkpoint"),
])
def test_a_checkpoint_whose_weights_do_not_fit_its_config_or_are_not_finite_is_one_line(damage, message, converted,
                                                                                        tmp_path):
    ckpt = torch.load(converted["llama3"], weights_only=True)
    damage(ckpt)
    torch.save(ckpt, tmp_path / "bad.ckpt")
    with pytest.raises(LLMKitError) as refused:
        load_backbone(tmp_path / "bad.ckpt")
    assert str(refused.value) == f"{tmp_path / 'bad.ckpt'}: {message}"


def test_the_finiteness_check_reads_float8_weights_and_skips_meta_and_integer_tensors():
    """float8 weights raised "isfinite not implemented for 'Float8_e4m3fn'" where they had imported."""
    from llmkit.io import non_finite_tensor

    fine = {"f8": torch.ones(4).to(torch.float8_e4m3fn), "meta": torch.empty(4, device="meta"),
            "ids": torch.arange(4), "bf16": torch.ones(4, dtype=torch.bfloat16)}
    assert non_finite_tensor(fine) is None
    assert non_finite_tensor({**fine, "bad": torch.tensor([1.0, math.nan]).to(torch.float8_e4m3fn)}) == "bad"
    assert non_finite_tensor({**fine, "bad": torch.tensor([math.inf], dtype=torch.bfloat16)}) == "bad"


def test_every_weight_is_checked_finite_once_and_a_damaged_one_is_refused(hf_models, converted, tmp_path, monkeypatch,
                                                                          capsys):
    """A Hugging Face directory's weights were checked twice (read_hf_model, then the backbone: about 1 s per
    100M bf16 elements each time); `convert upcycle` wrote an mHC checkpoint of a NaN one with rc 0."""
    import llmkit.model.checkpoint
    import llmkit.model.hf
    from llmkit.io import non_finite_tensor

    checked: list[str] = []

    def counting(tensors):
        checked.extend(tensors)
        return non_finite_tensor(tensors)

    for module in (llmkit.model.checkpoint, llmkit.model.hf):
        monkeypatch.setattr(module, "non_finite_tensor", counting)
    from safetensors.torch import load_file, save_file

    for source, stored in ((hf_models["llama3"][1], load_file(hf_models["llama3"][1] / "model.safetensors")),
                           (converted["llama3"], torch.load(converted["llama3"], weights_only=True)["state_dict"])):
        checked.clear()
        load_backbone(source)
        assert sorted(checked) == sorted(stored)
    ckpt = torch.load(converted["llama3"], weights_only=True)
    ckpt["state_dict"]["model.blocks.1.attn.q_proj.weight"][0, 0] = math.inf
    torch.save(ckpt, tmp_path / "bad.ckpt")
    assert main(["convert", "upcycle", "--ckpt", str(tmp_path / "bad.ckpt"), "--out", str(tmp_path / "n4.ckpt")]) == 1
    assert capsys.readouterr().err == f"llmkit: error: {tmp_path / 'bad.ckpt'}: blocks.1.attn.q_proj.weight holds " \
        "NaN or infinite values; the file is damaged or its run diverged: use an earlier checkpoint\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.ckpt"]
    # an llmkit model directory (an mHC model's export)
    assert main(["convert", "upcycle", "--ckpt", str(converted["llama3"]), "--out", str(tmp_path / "n4.ckpt")]) == 0
    assert main(["convert", "to-hf", "--ckpt", str(tmp_path / "n4.ckpt"), "--out", str(tmp_path / "out")]) == 0
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    tensors["blocks.0.mlp.down_proj.weight"][1, 1] = math.nan
    save_file(tensors, tmp_path / "out" / "model.safetensors")
    with pytest.raises(LLMKitError) as refused:
        load_backbone(tmp_path / "out")
    assert str(refused.value) == f"{tmp_path / 'out'}: blocks.0.mlp.down_proj.weight holds NaN or infinite values; " \
        "the weights are damaged: write the directory again (llmkit convert to-hf) from its checkpoint"


def split_without_index(model_dir: Path) -> None:
    """Two files holding the embedding each, and no index to say which is meant."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(model_dir / "model.safetensors")
    save_file({"model.embed_tokens.weight": tensors["model.embed_tokens.weight"]}, model_dir / "a.safetensors")
    save_file(tensors, model_dir / "b.safetensors")
    (model_dir / "model.safetensors").unlink()


def set_head(model_dir: Path, noise: float) -> None:
    """Store lm_head.weight: the embedding plus ``noise`` (0: equal to it), whatever the config says."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(model_dir / "model.safetensors")
    emb = tensors["model.embed_tokens.weight"]
    tensors["lm_head.weight"] = emb + noise * torch.randn(emb.shape, generator=torch.Generator().manual_seed(3))
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})


def test_a_tied_config_with_a_stored_head_equal_to_the_embedding_imports_tied(hf_models, converted, tmp_path):
    model_dir = break_dir(hf_models, tmp_path, "llama_tied")
    set_head(model_dir, 0.0)  # a tied model saved with both tensors
    model, x = load_backbone(model_dir), tokens()
    assert model.lm_head.weight is model.tok_emb.weight
    with torch.no_grad():
        expected = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()(x).logits
        assert torch.equal(model(x), load_backbone(converted["llama_tied"])(x))
        assert (expected - model(x)).abs().max().item() <= 1e-4


def test_a_tied_config_with_an_untied_head_is_refused_by_the_reader_as_well(hf_models, tmp_path):
    model_dir = break_dir(hf_models, tmp_path, "qwen2")
    set_head(model_dir, 0.1)
    shard(model_dir)  # lm_head.weight and model.embed_tokens.weight in different shards
    with pytest.raises(LLMKitError, match=r"model-0000\d-of-00002.safetensors: lm_head.weight differs"):
        read_hf_model(model_dir)


def test_rope_parameters_and_rope_scaling_that_agree_import_equally(hf_models, converted, tmp_path):
    model_dir = break_dir(hf_models, tmp_path)  # llama3: rope_parameters with rope_theta 500000
    params = json.loads((model_dir / "config.json").read_text())["rope_parameters"]
    scaling = {("type" if k == "rope_type" else k): v for k, v in params.items() if k != "rope_theta"}
    edit_config(model_dir, rope_theta=params["rope_theta"], rope_scaling=scaling)  # as transformers 4 wrote it
    x = tokens()
    with torch.no_grad():
        assert torch.equal(load_backbone(model_dir)(x), load_backbone(converted["llama3"])(x))


def with_a_nan(model_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = math.nan
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})


BAD = {
    "a file": (lambda d: (shutil.rmtree(d), d.write_text("x")),
               "is a file: pass the local Hugging Face model directory"),
    "no config.json": (lambda d: (d / "config.json").unlink(), "has no config.json"),
    "missing shard": (lambda d: (shard(d), (d / "model-00002-of-00002.safetensors").unlink()),
                      "names the shard model-00002-of-00002.safetensors, which is missing"),
    "shape mismatch": (lambda d: edit_config(d, intermediate_size=128),
                       "down_proj.weight has shape [64, 96] but config.json implies [64, 128]"),
    "unsupported architecture": (lambda d: edit_config(d, model_type="gpt2", architectures=["GPT2LMHeadModel"]),
                                 "model_type 'gpt2' is not supported"),
    "unknown rope type": (lambda d: edit_config(d, rope_parameters={"rope_type": "yarn", "factor": 4.0}),
                          "rope type 'yarn' (rope_parameters) is not supported"),
    "heads that do not divide": (lambda d: edit_config(d, num_key_value_heads=3),
                                 "config.json: invalid model config: n_heads (4) must be divisible by n_kv_heads (3) "
                                 "(in llmkit's names for the file's fields)"),
    "rope keys disagree": (lambda d: edit_config(d, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                                                 rope_scaling={"rope_type": "yarn", "factor": 4.0}),
                           "rope_parameters has rope_type 'default' but rope_scaling has 'yarn' (transformers reads "
                           "rope_scaling); remove the wrong one of the two keys"),
    "untied head in a tied config": (lambda d: edit_config(d, tie_word_embeddings=True),  # llama3 stores its head
                                     "model.safetensors: lm_head.weight differs from model.embed_tokens.weight, but "
                                     "config.json has tie_word_embeddings true (transformers 4 ties them, 5 does not): "
                                     "set tie_word_embeddings to false to keep this head, or delete lm_head.weight to "
                                     "tie it to the embedding"),
    "quantised": (lambda d: edit_config(d, quantization_config={"quant_method": "gptq"}),
                  "quantization_config (gptq): quantised weights are not supported"),
    "short sliding window": (lambda d: edit_config(d, model_type="mistral", sliding_window=32),
                             "sliding_window 32 is shorter than the context 96"),
    "rope scaling without its factor": (lambda d: edit_config(d, rope_parameters={"rope_type": "linear"},
                                                              rope_scaling=None),
                                        "rope_parameters of rope type 'linear' lacks factor; transformers needs them "
                                        "too"),
    "a count that is not whole": (lambda d: edit_config(d, num_hidden_layers=2.5),  # int() made it 2 layers
                                  "config.json: num_hidden_layers must be a whole number, got 2.5"),
    "a number as text": (lambda d: edit_config(d, rms_norm_eps="x"), "config.json: rms_norm_eps must be a number, "
                                                                     "got 'x'"),
    "rope parameters that are not a mapping": (lambda d: edit_config(d, rope_parameters="default"),
                                               "config.json: rope_parameters must be a mapping such as "
                                               '{"rope_type": "default"}, got \'default\''),
    "damaged weights": (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64),
                        "the file is damaged or not safetensors"),
    "weights holding NaN": (with_a_nan, "model.safetensors: model.layers.1.mlp.up_proj.weight holds NaN or infinite "
                            "values; the file is damaged: download the model again"),  # converted, rc 0
    "a tensor in two files": (split_without_index, "b.safetensors: tensor model.embed_tokens.weight is in another "
                              "file of"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_model_directory_is_one_line_and_writes_nothing(case, hf_models, tmp_path, capsys):
    model_dir = break_dir(hf_models, tmp_path)
    damage, message = BAD[case]
    damage(model_dir)
    out = tmp_path / "out.ckpt"
    assert main(["convert", "from-hf", "--model-dir", str(model_dir), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.glob(".out.ckpt*"))


def test_export_refuses_a_taken_directory_and_an_mhc_peft_adapter_and_clears_a_killed_one(converted, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert main(["convert", "to-hf", "--ckpt", str(converted["qwen2"]), "--out", str(tmp_path / "taken")]) == 1
    assert "already exists" in capsys.readouterr().err
    killed = tmp_path / f".exported.{dead_pid()}.tmp"  # an export killed with -9 left its temp directory
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"half")
    assert main(["convert", "to-hf", "--ckpt", str(converted["qwen2"]), "--out", str(tmp_path / "exported")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "taken"]
    config = ModelConfig(vocab_size=VOCAB, n_layers=1, d_model=32, n_heads=4, d_ff=64, max_seq_len=64, n_streams=2)
    with pytest.raises(LLMKitError, match="n_streams 2"):
        from llmkit.model.hf import hf_config
        hf_config(config, torch.float32, {})


# --- end to end: an imported model and its tokenizer.json through generate, sdft fit and ttt fit ---

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A tiny Llama with a byte-level BPE tokenizer.json trained here, a chat template and a
    vocabulary padded past the tokenizer's, as Hugging Face models ship them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from llmkit.data.tasks import write_task_files

    root = tmp_path_factory.mktemp("imported")
    write_task_files("arithmetic", 24, seed=0, out=root / "arith.jsonl")
    texts = [json.loads(line)["prompt"] + json.loads(line)["demonstration"]
             for line in (root / "arith.jsonl").read_text().splitlines()] * 4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    model_dir = root / "model"
    model_dir.mkdir()
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    vocab = -(-tok.get_vocab_size() // 16) * 16 + 16  # padded embedding rows the tokenizer never produces
    config = transformers.LlamaConfig(**{**COMMON, "vocab_size": vocab, "max_position_embeddings": 512},
                                      tie_word_embeddings=True, eos_token_id=tok.token_to_id("<|im_end|>"),
                                      bos_token_id=None, pad_token_id=tok.token_to_id("<|endoftext|>"))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(model_dir)
    ckpt = root / "base.ckpt"
    assert main(["convert", "from-hf", "--model-dir", str(model_dir), "--out", str(ckpt)]) == 0
    return {"dir": model_dir, "ckpt": ckpt, "examples": root / "arith.jsonl", "hf": model}


@pytest.mark.parametrize("chat", [False, True])
def test_generate_from_an_imported_model_prints_what_transformers_decodes(chat, imported, capsys):
    prompt = "What is 12 + 7?"
    assert main(["generate", "--ckpt", str(imported["ckpt"]), "--tokenizer", str(imported["dir"]), "--prompt", prompt,
                 "--max-new-tokens", "8", "--temperature", "0", *(["--chat-template"] if chat else [])]) == 0
    printed = capsys.readouterr().out.split("\n" + "-" * 40)[0]
    hf_tok = transformers.AutoTokenizer.from_pretrained(imported["dir"])
    text = hf_tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                      add_generation_prompt=True) if chat else prompt
    ids = torch.tensor([hf_tok.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        out = imported["hf"].generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                                      pad_token_id=hf_tok.pad_token_id)
    assert printed == prompt + hf_tok.decode(out[0, ids.size(1):], skip_special_tokens=True)


def test_export_keeps_every_stop_id_and_the_sampling_defaults(imported, tmp_path):
    """The export named only the first eos id (a chat model exported so stops at no end of turn) and
    dropped generation_config.json's sampling defaults; a tokenizer without BOS wrote bos_token_id -1."""
    from llmkit.data.tokenizer import load_tokenizer

    source = tmp_path / "source"
    shutil.copytree(imported["dir"], source)
    vocab = json.loads((source / "tokenizer.json").read_text())["added_tokens"]
    end_of_turn, end_of_text = (next(t["id"] for t in vocab if t["content"] == c) for c in ("<|im_end|>",
                                                                                         "<|endoftext|>"))
    edit_config(source, eos_token_id=[end_of_turn, end_of_text])
    (source / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [end_of_turn, end_of_text]}))
    out = tmp_path / "exported"
    assert main(["convert", "to-hf", "--ckpt", str(imported["ckpt"]), "--tokenizer", str(source),
                 "--out", str(out)]) == 0
    config, generation = (json.loads((out / name).read_text()) for name in ("config.json", "generation_config.json"))
    assert config["eos_token_id"] == generation["eos_token_id"] == [end_of_turn, end_of_text]
    assert config["bos_token_id"] is None and generation["bos_token_id"] is None
    assert (generation["do_sample"], generation["temperature"], generation["top_p"]) == (True, 0.6, 0.9)
    assert load_tokenizer(out).stop_ids == load_tokenizer(source).stop_ids == (end_of_turn, end_of_text)
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == [end_of_turn, end_of_text]


def test_upcycle_and_lora_merge_keep_the_tokenizer_link_and_the_weights_dtype(imported, tmp_path):
    """Their checkpoints lost the model directory a converted model came from (to-hf then wrote no
    tokenizer), and a merge of a bf16 base wrote fp32. They keep the tokenizer the base learned."""
    bf16, adapter = tmp_path / "bf16.ckpt", tmp_path / "adapter.safetensors"
    assert main(["convert", "from-hf", "--model-dir", str(imported["dir"]), "--out", str(bf16), "--dtype", "bf16"]) == 0
    adapted(bf16, adapter)
    merged, upcycled, from_dir = tmp_path / "merged.ckpt", tmp_path / "upcycled.ckpt", tmp_path / "from_dir.ckpt"
    assert main(["lora", "merge", "--ckpt", str(bf16), "--lora", str(adapter), "--out", str(merged)]) == 0
    assert {t.dtype for t in torch.load(merged, weights_only=True)["state_dict"].values()} == {torch.bfloat16}
    assert main(["convert", "upcycle", "--ckpt", str(merged), "--out", str(upcycled)]) == 0
    assert main(["convert", "upcycle", "--ckpt", str(imported["dir"]), "--out", str(from_dir)]) == 0
    learned = tokenizer_record(imported["dir"] / "tokenizer.json")  # from-hf records the directory's tokenizer
    for source in (bf16, merged, upcycled):
        assert torch.load(source, weights_only=True)[TOKENIZER_KEY] == learned, source
    for source in (merged, upcycled, from_dir):
        out = tmp_path / f"{source.stem}_exported"
        assert main(["convert", "to-hf", "--ckpt", str(source), "--out", str(out)]) == 0
        assert (out / "tokenizer.json").read_bytes() == (imported["dir"] / "tokenizer.json").read_bytes(), source


def test_sdft_and_ttt_fit_from_an_imported_model_with_its_chat_template(imported, tmp_path):
    import yaml

    common = {"init_ckpt": str(imported["ckpt"]), "chat_template": True}  # sdft: the tokenizer the checkpoint records
    trainer = {"accelerator": "cpu", "max_steps": 2, "enable_progress_bar": False, "logger": False,
               "enable_model_summary": False, "num_sanity_val_steps": 0, "limit_val_batches": 0}
    sdft = {"seed_everything": 0,
            "trainer": {**trainer, "default_root_dir": str(tmp_path / "sdft"), "callbacks": [
                {"class_path": "llmkit.callbacks.EMATeacher", "init_args": {"decay": 0.9}},
                {"class_path": "llmkit.callbacks.Checkpoint", "init_args": {"dirpath": str(tmp_path / "ckpt"),
                                                                            "save_last": True}}]},
            "model": {**common, "sdft": {"max_new_tokens": 6}, "optim": {"lr": 1e-3, "warmup_steps": 1}},
            "data": {"train_files": [str(imported["examples"])], "val_files": [str(imported["examples"])],
                     "batch_size": 2}}
    (tmp_path / "sdft.yaml").write_text(yaml.safe_dump(sdft))
    assert main(["sdft", "fit", "--config", str(tmp_path / "sdft.yaml")]) == 0
    after = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert after["global_step"] == 2
    assert after[TOKENIZER_KEY] == tokenizer_record(imported["dir"] / "tokenizer.json")
    before = read_checkpoint(imported["ckpt"])["state_dict"]
    assert not torch.equal(after["state_dict"]["model.blocks.0.attn.q_proj.weight"],
                           before["model.blocks.0.attn.q_proj.weight"])
    ttt = {"seed_everything": 0, "trainer": {**trainer, "default_root_dir": str(tmp_path / "ttt"),
                                             "enable_checkpointing": False},
           "model": {**common, "tokenizer": str(imported["dir"]), "out_dir": str(tmp_path / "ttt_out"),
                     "lora": {"rank": 2, "alpha": 4.0},
                     "ttt": {"env": "llmkit.discovery.envs.StringTargetEnv",
                             "env_args": {"target": "sum", "metric": "edit"},
                             "starts_per_step": 1, "group_size": 3, "max_new_tokens": 6}}}
    (tmp_path / "ttt.yaml").write_text(yaml.safe_dump(ttt))
    assert main(["ttt", "fit", "--config", str(tmp_path / "ttt.yaml")]) == 0
    result = json.loads((tmp_path / "ttt_out" / "result.json").read_text())
    assert result["steps"] == 2 and result["rollouts"] == 2 * 1 * 3
    assert (tmp_path / "ttt_out" / "discovery_log.jsonl").read_text().count("\n") == 2


def test_continued_pretraining_of_an_imported_model_upcycled_to_mhc(imported, tmp_path, capsys):
    """Pack text with the model's tokenizer.json, upcycle, check through the CLI that the upcycled
    model's validation loss is the dense model's, pretrain two steps, and validate from the run's
    checkpoint alone."""
    import yaml

    text = tmp_path / "text.txt"
    text.write_text("\n".join(json.loads(line)["prompt"] + json.loads(line)["demonstration"]
                              for line in imported["examples"].read_text().splitlines()) * 3)
    shard = tmp_path / "text.bin"
    assert main(["data", "pack", "--tokenizer", str(imported["dir"]), "--input", str(text), "--output", str(shard),
                 "--workers", "1"]) == 0
    upcycled = tmp_path / "mhc.ckpt"
    assert main(["convert", "upcycle", "--ckpt", str(imported["ckpt"]), "--out", str(upcycled),
                 "--n-streams", "2"]) == 0
    config = {"seed_everything": 0,
              "trainer": {"accelerator": "cpu", "max_steps": 2, "enable_progress_bar": False,
                          "enable_model_summary": False, "num_sanity_val_steps": 0, "limit_val_batches": 2,
                          "default_root_dir": str(tmp_path / "logs"), "logger": False, "callbacks": [
                              {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                               "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}}]},
              "model": {"optim": {"lr": 1e-3, "warmup_steps": 1}},
              "data": {"train_files": [str(shard)], "val_files": [str(shard)], "seq_len": 32, "batch_size": 2}}
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump(config))
    run = ["pretrain", "validate", "--config", str(tmp_path / "pretrain.yaml")]

    def val_loss() -> float:
        out = capsys.readouterr().out
        return float(next(line.split()[-2] for line in out.splitlines() if "val/loss" in line))

    assert main([*run, "--model.init_ckpt", str(imported["ckpt"])]) == 0
    dense = val_loss()
    assert main([*run, "--model.init_ckpt", str(upcycled)]) == 0
    assert val_loss() == pytest.approx(dense, abs=1e-5)
    assert main(["pretrain", "fit", "--config", str(tmp_path / "pretrain.yaml"), "--model.init_ckpt",
                 str(upcycled)]) == 0
    last = read_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert last["global_step"] == 2 and last["model_config"]["n_streams"] == 2
    assert last["model_config"]["vocab_size"] == read_checkpoint(imported["ckpt"])["model_config"]["vocab_size"]
    upcycled.unlink()  # the run's checkpoint alone rebuilds the model
    assert main([*run, "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt")]) == 0
    assert val_loss() < dense
