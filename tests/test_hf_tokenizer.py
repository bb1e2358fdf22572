"""Hugging Face tokenizers (tokenizer.json + the model directory's special ids), load_tokenizer,
chat templates in jinja2's sandbox, and the fine-tuning modules' chat_template option.

Everything is built in temporary directories: a byte-level BPE tokenizer.json trained here with the
`tokenizers` library (Qwen's pre-tokenizer, a post-processor that would add <s> ... </s> if asked),
beside the config.json / tokenizer_config.json of a model directory.
"""

from __future__ import annotations

import importlib
import json
import pickle
import shutil
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as RawTokenizer

from llmkit.cli import main
from llmkit.data.examples import Example, teacher_prompt
from llmkit.data.hf_tokenizer import HFTokenizer
from llmkit.data.packing import open_shard, pack
from llmkit.data.tokenizer import Tokenizer, TokenizerLike, load_tokenizer
from llmkit.errors import LLMKitError
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer
from llmkit.modules.sdft import SDFTModule
from llmkit.modules.sft import SFTModule
from llmkit.modules.ttt_discover import TTTDiscoverModule
from tests.conftest import VOCAB_SIZE

SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MIXED_TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Café crème, naïve façade, Ærøskøbing, señor Müller.",
    "日本語のテキストと中文文本，还有한국어.",
    "Emoji: 🎉🚀👍🏽 and a family 👨‍👩‍👧 in one line.",
    "def add(a, b):\n    if a:\n\t\treturn a + b  # tabs\n    return b\n\n\n",
    "Digits 1234567890 and 3.14159, 1e-9, 0x1F; spaces   and   runs.",
    "<|im_start|>user\nspecial tokens in text<|im_end|>\n",
]
CORPUS = [
    "def total(items, start=0):\n    for item in items:\n        start += item\n    return start\n",
    "The quick brown fox jumps over the lazy dog. Café, naïve, Müller, señor.",
    "日本語のテキスト、中文文本、한국어 텍스트。 Emoji 🎉🚀👍",
    "Numbers 1234567890 and 3.14159 and 42; return the value of the items.",
] * 25


def write_model_dir(directory: Path, source: Path, config: dict | None = None, tokenizer_config: dict | None = None,
                    generation_config: dict | None = None) -> Path:
    """A model directory: ``source``'s tokenizer.json and the JSON files given (the others absent)."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, directory / "tokenizer.json")
    for name, value in (("config.json", config), ("tokenizer_config.json", tokenizer_config),
                        ("generation_config.json", generation_config)):
        if value is not None:
            (directory / name).write_text(json.dumps(value), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def raw_json(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer.json of 400 tokens whose post-processor adds <s> and </s>."""
    tok = RawTokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))]
    )
    path = tmp_path_factory.mktemp("raw") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def ids(raw_json) -> dict[str, int]:
    raw = RawTokenizer.from_file(str(raw_json))
    return {token: raw.token_to_id(token) for token in SPECIALS}


@pytest.fixture(scope="module")
def model_dir(raw_json, ids, tmp_path_factory) -> Path:
    """Qwen-like: config.json names bos and a list of eos ids (<|im_end|> first); tokenizer_config.json
    names other bos/eos strings (config.json wins), the pad token and the chat template."""
    return write_model_dir(
        tmp_path_factory.mktemp("model"), raw_json,
        config={"bos_token_id": ids["<s>"], "eos_token_id": [ids["<|im_end|>"], ids["</s>"]]},
        tokenizer_config={"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                          "chat_template": CHAT_TEMPLATE},
    )


@pytest.fixture(scope="module")
def tok(model_dir) -> HFTokenizer:
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def hf(raw_json):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(raw_json))


def save_backbone(path: Path, vocab_size: int) -> Path:
    """A tiny random llmkit checkpoint of ``vocab_size`` embedding rows."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab_size, n_layers=1, d_model=32, n_heads=4, d_ff=64, max_seq_len=256,
                         n_streams=1)
    state = {f"model.{k}": v for k, v in Transformer(config).state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"config": config.to_dict()}}, path)
    return path


# --- encoding and decoding -----------------------------------------------------------------------


def test_encode_equals_transformers_without_special_tokens_added(tok, hf):
    for text in MIXED_TEXTS:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False), text
    assert tok.encode_batch(MIXED_TEXTS) == [tok.encode(t) for t in MIXED_TEXTS]
    assert tok.encode_batch(MIXED_TEXTS, num_threads=2) == [tok.encode(t) for t in MIXED_TEXTS]
    # special tokens written in the text are matched as such, exactly as transformers does
    assert tok.encode(MIXED_TEXTS[-1])[0] == tok.encode("<|im_start|>")[0] == hf.convert_tokens_to_ids("<|im_start|>")


def test_bos_and_eos_are_added_by_llmkit_not_the_post_processor(tok, ids):
    text = MIXED_TEXTS[0]
    plain = tok.encode(text)
    assert ids["<s>"] not in plain and ids["</s>"] not in plain  # the post-processor would have added both
    assert tok.encode(text, bos=True, eos=True) == [ids["<s>"], *plain, ids["<|im_end|>"]]
    assert tok.encode_batch([text], bos=True, eos=True) == [[ids["<s>"], *plain, ids["<|im_end|>"]]]


def test_decode_round_trips_and_equals_transformers(tok, hf):
    for text in MIXED_TEXTS[:-1]:
        encoded = tok.encode(text)
        assert tok.decode(encoded) == text == hf.decode(encoded)


def test_decode_drops_specials_and_ids_beyond_the_vocabulary(tok):
    a, b = tok.encode("x = 1\n"), tok.encode("y = 2\n")
    padding_rows = [tok.vocab_size, tok.vocab_size + 7]
    assert tok.decode([tok.bos_id, *a, tok.eos_id, *b, *padding_rows, tok.pad_id, tok.pad_id]) == "x = 1\ny = 2\n"


# --- special ids ---------------------------------------------------------------------------------


def test_special_ids_come_from_config_json_first(tok, ids):
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (ids["<s>"], ids["<|im_end|>"], ids["<pad>"], -1)
    raw = RawTokenizer.from_file(str(tok.path))
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True) == 400
    assert isinstance(tok, TokenizerLike)


def test_special_ids_fall_back_to_generation_config_then_tokenizer_config(raw_json, ids, tmp_path):
    generated = load_tokenizer(write_model_dir(
        tmp_path / "gen", raw_json, config={"eos_token_id": None},
        generation_config={"bos_token_id": ids["<|im_start|>"], "eos_token_id": ids["</s>"], "pad_token_id": -1},
        tokenizer_config={"pad_token": "<pad>"},
    ))
    assert (generated.bos_id, generated.eos_id, generated.pad_id) == (ids["<|im_start|>"], ids["</s>"], ids["<pad>"])
    strings = load_tokenizer(write_model_dir(tmp_path / "str", raw_json,
                                             tokenizer_config={"bos_token": None, "eos_token": {"content": "</s>"}}))
    assert (strings.bos_id, strings.eos_id) == (-1, ids["</s>"])
    assert strings.pad_id == strings.eos_id  # no pad token: pad with eos
    with pytest.raises(LLMKitError, match="has no bos token"):
        strings.encode("x", bos=True)


def test_stop_ids_are_eos_then_every_other_id_the_eos_lists_name(raw_json, ids, tokenizer_path, tmp_path):
    """Llama 3.x Instruct lists <|end_of_text|>, <|eom_id|>, <|eot_id|>: generation must stop at each."""
    listed = load_tokenizer(write_model_dir(
        tmp_path / "listed", raw_json, config={"eos_token_id": [ids["</s>"], ids["<|im_end|>"]]},
        generation_config={"eos_token_id": [ids["</s>"], ids["<|im_start|>"], ids["<|im_end|>"]]},
    ))
    assert listed.eos_id == ids["</s>"]
    assert listed.stop_ids == (ids["</s>"], ids["<|im_end|>"], ids["<|im_start|>"])
    assert load_tokenizer(tokenizer_path).stop_ids == (3,)


def test_a_bare_tokenizer_json_reads_the_files_beside_it(model_dir, tok):
    bare = load_tokenizer(model_dir / "tokenizer.json")
    assert (bare.path, bare.bos_id, bare.eos_id, bare.pad_id) == (tok.path, tok.bos_id, tok.eos_id, tok.pad_id)


def test_bad_special_ids_are_one_line_errors_naming_the_file_and_key(raw_json, ids, tmp_path):
    cases = [
        ({}, {}, r"no eos token beside it"),
        ({"eos_token_id": 400}, {}, r"config\.json: eos_token_id 400 is outside the tokenizer's vocabulary of 400"),
        ({"eos_token_id": "2"}, {}, r"config\.json: eos_token_id must be a token id"),
        ({}, {"eos_token": "<nope>"}, r"tokenizer_config\.json: eos_token '<nope>' is not in the vocabulary"),
    ]
    for i, (config, tokenizer_config, message) in enumerate(cases):
        directory = write_model_dir(tmp_path / str(i), raw_json, config=config, tokenizer_config=tokenizer_config)
        with pytest.raises(LLMKitError, match=message) as error:
            load_tokenizer(directory)
        assert "\n" not in str(error.value)


# --- load_tokenizer, pickling, vocabulary sizes --------------------------------------------------


def test_load_tokenizer_dispatches_on_what_the_path_is(tokenizer_path, model_dir, tmp_path):
    assert type(load_tokenizer(tokenizer_path)) is Tokenizer
    assert type(load_tokenizer(str(model_dir / "tokenizer.json"))) is HFTokenizer
    assert load_tokenizer(model_dir).path == model_dir / "tokenizer.json"
    sp_dir = tmp_path / "sp"
    sp_dir.mkdir()
    shutil.copyfile(tokenizer_path, sp_dir / "tokenizer.model")
    sp = load_tokenizer(sp_dir)
    assert type(sp) is Tokenizer and sp.path == sp_dir / "tokenizer.model" and sp.vocab_size == VOCAB_SIZE
    assert sp.chat_template is None and isinstance(sp, TokenizerLike)

    (tmp_path / "empty").mkdir()
    corrupt = tmp_path / "corrupt" / "tokenizer.json"
    corrupt.parent.mkdir()
    corrupt.write_text('{"version": "1.0", "model": {', encoding="utf-8")
    for path, message in ((tmp_path / "empty", "has neither tokenizer.json nor tokenizer.model"),
                          (tmp_path / "missing.json", "missing.json does not exist: pass a SentencePiece .model"),
                          (corrupt, f"{corrupt} is not a Hugging Face tokenizer.json"),
                          (corrupt.parent, f"{corrupt} is not a Hugging Face tokenizer.json")):
        with pytest.raises(LLMKitError, match=message) as error:
            load_tokenizer(path)
        assert "\n" not in str(error.value)


def test_pickles_as_its_path(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert type(clone) is HFTokenizer and clone.path == tok.path
    assert clone.encode(MIXED_TEXTS[2]) == tok.encode(MIXED_TEXTS[2])
    assert (clone.bos_id, clone.eos_id, clone.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert repr(clone) == f"HFTokenizer({str(tok.path)!r}, vocab_size=400)"
    assert len(tok.sha256) == 64


def test_a_model_may_pad_its_vocabulary_but_not_fall_short(tok, tokenizer_path):
    tok.check_vocab_size(400, "the model")
    tok.check_vocab_size(416, "the model")  # padded embedding rows, as Qwen's
    with pytest.raises(LLMKitError, match=rf"tokenizer {tok.path} has vocab_size 400 but the model has only 399"):
        tok.check_vocab_size(399, "the model")
    sentencepiece = load_tokenizer(tokenizer_path)
    with pytest.raises(LLMKitError, match=f"vocab_size {VOCAB_SIZE} but the model has {VOCAB_SIZE + 16}"):
        sentencepiece.check_vocab_size(VOCAB_SIZE + 16, "the model")  # llmkit's own: exactly its size


def test_pack_with_a_tokenizer_json(tok, tmp_path):
    text = tmp_path / "docs.txt"
    text.write_text("def f(x):\n    return x\n<|endoftext|>\nCafé 日本 🎉\n", encoding="utf-8")
    meta = pack(tok.path, [text], tmp_path / "out.bin", workers=1, progress=False)
    tokens, _ = open_shard(tmp_path / "out.bin")
    expected = tok.encode("def f(x):\n    return x\n", eos=True) + tok.encode("Café 日本 🎉\n", eos=True)
    assert tokens.tolist() == expected
    assert (meta["vocab_size"], meta["eos_id"], meta["bos_id"], meta["pad_id"]) == (400, tok.eos_id, tok.bos_id,
                                                                                     tok.pad_id)
    assert meta["tokenizer"] == str(tok.path.resolve()) and meta["tokenizer_sha256"] == tok.sha256


def test_pack_encodes_special_token_text_in_a_document_as_text(tok, tmp_path):
    """A document that quotes the end-of-sequence token ended there (a second eos in one document),
    and one that quotes a chat marker got the marker's id."""
    raw = RawTokenizer.from_file(str(tok.path))
    text = tmp_path / "quoting.txt"
    text.write_text(f'tokens = {{"{raw.id_to_token(tok.eos_id)}": 2}}  # <|im_start|> too\n', encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and it gives the text back: no round-trip warning
        pack(tok.path, [text], tmp_path / "out.bin", workers=1, progress=False)
    tokens = open_shard(tmp_path / "out.bin")[0].tolist()
    specials = {tok.eos_id, tok.bos_id, raw.token_to_id("<|im_start|>")}
    assert [t for t in tokens if t in specials] == [tok.eos_id] and tokens[-1] == tok.eos_id
    assert tok.decode(tokens) == text.read_text()
    assert tok.encode("<|im_start|>") == [raw.token_to_id("<|im_start|>")]  # elsewhere: the marker


# --- chat templates ------------------------------------------------------------------------------


def test_render_chat_equals_transformers_apply_chat_template(tok, model_dir):
    transformers = pytest.importorskip("transformers")
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    assert tok.chat_template == CHAT_TEMPLATE
    for prompt in ("What is 12 + 30?", MIXED_TEXTS[1], MIXED_TEXTS[4]):
        messages = [{"role": "user", "content": prompt}]
        expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tok.render_chat(prompt) == expected
        assert expected == f"<s><|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_jinja_wins_and_a_template_list_gives_its_default(raw_json, ids, tmp_path):
    templates = [{"name": "tool_use", "template": "tools"},
                 {"name": "default", "template": "Q: {{ messages[0].content }}"}]
    listed = write_model_dir(tmp_path / "list", raw_json, config={"eos_token_id": ids["</s>"]},
                             tokenizer_config={"chat_template": templates})
    assert load_tokenizer(listed).render_chat("hi") == "Q: hi"
    (listed / "chat_template.jinja").write_text("J: {{ messages[0].content }}", encoding="utf-8")
    assert load_tokenizer(listed).render_chat("hi") == "J: hi"


def chat_tokenizer(raw_json: Path, directory: Path, template: str) -> HFTokenizer:
    return load_tokenizer(write_model_dir(directory, raw_json, tokenizer_config={"eos_token": "</s>",
                                                                                  "chat_template": template}))


def test_template_errors_and_raise_exception_are_one_line_errors(raw_json, tmp_path):
    strict = chat_tokenizer(raw_json, tmp_path / "strict", "{{ raise_exception('Only\nsystem first') }}")
    config = tmp_path / "strict" / "tokenizer_config.json"
    with pytest.raises(LLMKitError, match=f"the chat template in {config} refused the conversation: Only system first"):
        strict.render_chat("hi")
    broken = chat_tokenizer(raw_json, tmp_path / "broken", "{% if %}")
    with pytest.raises(LLMKitError, match="is not valid Jinja") as error:
        broken.render_chat("hi")
    assert "\n" not in str(error.value)
    failing = chat_tokenizer(raw_json, tmp_path / "failing", "{{ 1 / 0 }}")
    with pytest.raises(LLMKitError, match="failed to render a prompt \\(ZeroDivisionError"):
        failing.render_chat("hi")


def test_the_sandbox_refuses_python_internals_and_mutation(raw_json, tmp_path):
    escape = chat_tokenizer(raw_json, tmp_path / "escape", "{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(LLMKitError, match="SecurityError: access to attribute '__class__' of 'str' object is unsafe"):
        escape.render_chat("hi")
    globals_ = chat_tokenizer(raw_json, tmp_path / "globals", "{{ raise_exception.__globals__['os'] }}")
    with pytest.raises(LLMKitError, match="access to attribute '__globals__' of 'function' object is unsafe"):
        globals_.render_chat("hi")
    mutate = chat_tokenizer(raw_json, tmp_path / "mutate", "{{ messages.append(1) }}")
    with pytest.raises(LLMKitError, match="access to attribute 'append' of 'list' object is unsafe"):
        mutate.render_chat("hi")
    # an unsafe attribute that is only printed renders as nothing
    quiet = chat_tokenizer(raw_json, tmp_path / "quiet", "[{{ ''.__class__ }}{{ raise_exception.__globals__ }}]")
    assert quiet.render_chat("hi") == "[]"


def test_a_sentencepiece_tokenizer_has_no_chat_template(tokenizer_path):
    sp = load_tokenizer(tokenizer_path)
    assert sp.chat_template is None
    with pytest.raises(LLMKitError, match="is a SentencePiece model, which has no chat template"):
        sp.render_chat("hi")


# --- the modules' chat_template option -----------------------------------------------------------


@pytest.fixture(scope="module")
def padded_ckpt(tmp_path_factory) -> Path:
    """A backbone with 16 more embedding rows than the tokenizer has tokens."""
    return save_backbone(tmp_path_factory.mktemp("hf_ckpt") / "base.ckpt", 416)


EXAMPLES = [Example("What is 2 + 3?", "5", source="a:1"), Example("Name a colour.", "Blue.", source="a:2")]


def recorded_contexts(monkeypatch, module_name: str) -> list[tuple[list, list]]:
    """Record the (contexts, continuations) every continuation_logits call of ``module_name`` gets."""
    calls = []
    original = importlib.import_module(module_name).continuation_logits

    def record(model, contexts, continuations, pad_id):
        calls.append((contexts, continuations))
        return original(model, contexts, continuations, pad_id)

    monkeypatch.setattr(f"{module_name}.continuation_logits", record)
    return calls


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_sdft_renders_the_student_and_teacher_prompts_through_the_chat_template(padded_ckpt, model_dir, tok,
                                                                                  monkeypatch):
    calls = recorded_contexts(monkeypatch, "llmkit.modules.sdft")
    module = SDFTModule(init_ckpt=str(padded_ckpt), tokenizer=str(model_dir), chat_template=True,
                        sdft={"max_new_tokens": 3})
    assert module.hparams["chat_template"] is True
    module.loss_sum(EXAMPLES, "val", 0)
    (students, _), (teachers, _) = calls
    assert students == [tok.encode(tok.render_chat(e.prompt)) for e in EXAMPLES]
    assert teachers == [tok.encode(tok.render_chat(teacher_prompt(e))) for e in EXAMPLES]
    assert students[0][-3:] == tok.encode("<|im_start|>assistant\n")[-3:]


def test_sft_prompts_are_rendered_and_demonstrations_end_with_eos(padded_ckpt, model_dir, tok, monkeypatch):
    calls = recorded_contexts(monkeypatch, "llmkit.modules.sft")
    for chat_template in (True, False):
        SFTModule(str(padded_ckpt), str(model_dir), chat_template=chat_template).loss_sum(EXAMPLES, "train", 0)
    (chat, targets), (plain, _) = calls
    assert chat == [tok.encode(tok.render_chat(e.prompt)) for e in EXAMPLES]
    assert plain == [tok.encode(e.prompt) for e in EXAMPLES]
    assert targets == [tok.encode(e.demonstration) + [tok.eos_id] for e in EXAMPLES]


def test_chat_sft_ends_a_demonstration_with_the_turn_end_of_the_template(padded_ckpt, raw_json, ids, tmp_path,
                                                                        monkeypatch):
    """Llama 3.x lists <|end_of_text|> first among its eos ids and ends a turn with <|eot_id|>: chat SFT taught
    the first, so the fine-tuned model ran past its turn's end. Here </s> plays <|end_of_text|>, <|im_end|>
    <|eot_id|>."""
    directory = write_model_dir(tmp_path / "llama3like", raw_json,
                                config={"bos_token_id": ids["<s>"], "eos_token_id": [ids["</s>"], ids["<|im_end|>"]]},
                                tokenizer_config={"pad_token": "<pad>", "chat_template": CHAT_TEMPLATE})
    tok = load_tokenizer(directory)
    assert (tok.eos_id, tok.turn_end_id) == (ids["</s>"], ids["<|im_end|>"])
    calls = recorded_contexts(monkeypatch, "llmkit.modules.sft")
    for chat_template in (True, False):
        SFTModule(str(padded_ckpt), str(directory), chat_template=chat_template).loss_sum(EXAMPLES, "train", 0)
    (_, chat_targets), (_, plain_targets) = calls
    assert [t[-1] for t in chat_targets] == [ids["<|im_end|>"]] * len(EXAMPLES)
    assert [t[-1] for t in plain_targets] == [ids["</s>"]] * len(EXAMPLES)  # a document ends with eos


def test_ttt_renders_the_environment_context_through_the_chat_template(padded_ckpt, model_dir, tok, monkeypatch):
    class Sampled(Exception):
        """Stops the training step once the sampler has its contexts."""

    def sampler(model, contexts, *args):
        raise Sampled(contexts)

    monkeypatch.setattr("llmkit.modules.ttt_discover.generate", sampler)
    # score in this process: the sandboxed worker takes seconds to start and is not what is tested here
    monkeypatch.setattr("llmkit.modules.ttt_discover.safe_reward",
                        lambda env, state, timeout, worker: (env.reward(state), None))
    ttt = {"env_args": {"target": "alpha"}, "starts_per_step": 1, "group_size": 3, "max_new_tokens": 4}
    module = TTTDiscoverModule(init_ckpt=str(padded_ckpt), tokenizer=str(model_dir), ttt=ttt, chat_template=True,
                               lora={"rank": 2, "alpha": 4.0})
    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)  # one process: it samples every rollout
    with pytest.raises(Sampled) as sampled:
        module.training_step([0], 0)
    prompt = module.env.context_from_archive(module.archive.get(0).text, [module.archive.get(0).text])
    assert sampled.value.args[0] == [tok.encode(tok.render_chat(prompt))] * 3


@pytest.mark.parametrize("chat_template", [True, False])
def test_the_gate_scores_probes_through_the_chat_template_as_the_module_trains(chat_template, padded_ckpt, model_dir,
                                                                             tok, tmp_path, monkeypatch):
    """Probes are prompts like the training ones: rendered through the template when the module's are."""
    from llmkit.callbacks import RegressionGate

    class Sampled(Exception):
        """Stops the evaluation once the probe sampler has its contexts."""

    def sampler(model, contexts, *args, **kwargs):
        raise Sampled(contexts)

    monkeypatch.setattr("llmkit.eval.probes.generate", sampler)
    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"name": "sum", "prompt": "What is 2 + 3?", "expect_substring": "5"}) + "\n")
    module = SFTModule(str(padded_ckpt), str(model_dir), chat_template=chat_template)
    gate = RegressionGate(evaluation={"probes": str(probes)})  # an EvalConfig's dict, as YAML gives it
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    gate.setup(trainer, module, "fit")
    with pytest.raises(Sampled) as sampled:
        gate._evaluate(trainer, module)
    prompt = tok.render_chat("What is 2 + 3?") if chat_template else "What is 2 + 3?"
    assert sampled.value.args[0] == [tok.encode(prompt)]


def test_chat_template_without_a_template_is_a_one_line_error_at_setup(tokenizer_path, raw_json, ids, tmp_path):
    sp_ckpt = save_backbone(tmp_path / "sp.ckpt", VOCAB_SIZE)
    no_template = write_model_dir(tmp_path / "plain", raw_json, config={"eos_token_id": ids["</s>"]})
    hf_ckpt = save_backbone(tmp_path / "hf.ckpt", 400)
    for module in (SFTModule, SDFTModule, TTTDiscoverModule):
        for ckpt, tokenizer in ((sp_ckpt, tokenizer_path), (hf_ckpt, no_template / "tokenizer.json")):
            with pytest.raises(LLMKitError, match=rf"model.chat_template is true but the tokenizer {tokenizer} has no "
                                                  "chat template") as error:
                module(init_ckpt=str(ckpt), tokenizer=str(tokenizer), chat_template=True)
            assert "\n" not in str(error.value)


def test_a_tokenizer_without_a_template_trains_with_the_gate_when_chat_template_is_off(raw_json, ids, tmp_path):
    """The gate's setup checks the module's tokenizer against TokenizerLike, which on Python 3.11 reads every
    property: turn_end_id raised "has no chat template" though chat_template was off."""
    from llmkit.callbacks import RegressionGate

    no_template = write_model_dir(tmp_path / "plain", raw_json, config={"eos_token_id": ids["</s>"]})
    assert load_tokenizer(no_template).turn_end_id == ids["</s>"]
    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"name": "sum", "prompt": "What is 2 + 3?", "expect_substring": "5"}) + "\n")
    module = SFTModule(str(save_backbone(tmp_path / "hf.ckpt", 400)), str(no_template))
    gate = RegressionGate(evaluation={"probes": str(probes)})
    gate.setup(L.Trainer(accelerator="cpu", devices=1, logger=False), module, "fit")
    assert gate._tokenizer is module.tokenizer


def test_generate_takes_a_model_directory_and_a_padded_vocabulary(padded_ckpt, model_dir, tmp_path, capsys):
    def generate(ckpt: Path) -> int:
        return main(["generate", "--ckpt", str(ckpt), "--tokenizer", str(model_dir), "--prompt", "def f(x):",
                     "--max-new-tokens", "4", "--temperature", "0"])

    assert generate(padded_ckpt) == 0
    assert capsys.readouterr().out.startswith("def f(x):")
    small = save_backbone(tmp_path / "small.ckpt", 300)
    assert generate(small) == 1
    assert f"tokenizer {model_dir / 'tokenizer.json'} has vocab_size 400 but checkpoint {small} has only 300" in \
        capsys.readouterr().err
