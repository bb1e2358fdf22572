"""SDFT data: the teacher template, JSONL examples, SDFTDataModule, generated tasks and probes."""

import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from llmkit.cli import main
from llmkit.data.examples import TEACHER_TEMPLATE, Example, read_examples, teacher_prompt
from llmkit.data.sdft_data import SDFTDataModule
from llmkit.data.tasks import (
    FACTS,
    FACTS_PER_TABLE,
    TASKS,
    answer_regex,
    fact_table,
    make_examples,
    make_probes,
    write_task_files,
)
from llmkit.errors import LLMKitError
from llmkit.eval.probes import read_probes
from llmkit.modules.sdft import SDFTConfig

PAPER_TEMPLATE = """<Question>
{prompt}

This is an example for a response to the question:
<Demonstration>
{demonstration}

Now answer with a response of your own, including the thinking process:"""


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_teacher_template_is_the_papers_verbatim_and_fills_both_fields():
    assert TEACHER_TEMPLATE == PAPER_TEMPLATE
    example = Example("What is 2 + 3?", "2 + 3 = 5")
    assert teacher_prompt(example) == (
        "<Question>\nWhat is 2 + 3?\n\nThis is an example for a response to the question:\n"
        "<Demonstration>\n2 + 3 = 5\n\nNow answer with a response of your own, including the thinking process:"
    )
    official = TEACHER_TEMPLATE.removesuffix(":") + "."
    assert teacher_prompt(example, official).endswith("including the thinking process.")
    # braces in the text are data, not template fields
    assert "{x}" in teacher_prompt(Example("f({x})", "{y}"))


@pytest.mark.parametrize(
    "template, message",
    [("{prompt} only", "lacks ['demonstration']"), ("{prompt} {demonstration} {other}", "unknown fields ['other']"),
     ("{prompt {demonstration}", "malformed"),
     # passed, and the teacher saw the prompt in repr quotes and a padded demonstration
     ("{prompt!r} {demonstration:>5}", "without a conversion or format spec ({prompt!r}, {demonstration:>5})")],
)
def test_a_bad_teacher_template_is_refused(template, message):
    with pytest.raises(LLMKitError, match=re.escape(message)):
        teacher_prompt(Example("p", "d"), template)
    with pytest.raises(LLMKitError, match=re.escape(message)):
        SDFTConfig(teacher_template=template)


def test_read_examples_keeps_extra_fields_in_meta_and_records_the_source(tmp_path):
    path = write_lines(tmp_path / "ex.jsonl", [
        json.dumps({"prompt": "p1", "demonstration": "d1", "task": "t", "answer": "7"}),
        "",
        json.dumps({"prompt": "p2", "demonstration": "d2"}),
    ])
    first, second = read_examples(path)
    assert first == Example("p1", "d1", {"task": "t", "answer": "7"}, f"{path}:1")
    assert second == Example("p2", "d2", {}, f"{path}:3")


@pytest.mark.parametrize(
    "line, message",
    [('{"prompt": "p", "demonstration": ', "not valid JSON (Expecting value at the end of the line)"),
     ('{"prompt": "p", "demonstration": "a\tb"}', "not valid JSON (Invalid control character at column 36)"),  # it
     # ended "at)"
     ('["p", "d"]', "got an array where a JSON object is needed"),
     ('{"prompt": "p"}', "no 'demonstration' field"),
     ('{"prompt": 3, "demonstration": "d"}', "'prompt' is a number; it must be a string"),
     ('{"prompt": "p", "demonstration": "  "}', "'demonstration' is empty")],
)
def test_a_malformed_line_is_reported_with_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps({"prompt": "p", "demonstration": "d"}), line])
    with pytest.raises(LLMKitError, match=re.escape(f"{path}:2: {message}")):
        read_examples(path)


def test_an_empty_or_missing_file_is_reported_by_name(tmp_path):
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(LLMKitError, match=re.escape(f"{empty} has no examples")):
        read_examples(empty)
    with pytest.raises(LLMKitError, match=re.escape(f"{tmp_path / 'none.jsonl'} does not exist")):
        read_examples(tmp_path / "none.jsonl")


def epoch_prompts(loader) -> list[list[str]]:
    return [[example.prompt for example in batch] for batch in loader]


def test_datamodule_batches_are_lists_of_examples_covering_each_once_per_epoch(tmp_path):
    write_task_files("arithmetic", 10, 0, tmp_path / "a.jsonl")
    write_task_files("upper", 7, 0, tmp_path / "b.jsonl")
    dm = SDFTDataModule(train_files=str(tmp_path / "*.jsonl"), batch_size=4, seed=3)
    dm.setup("fit")
    assert len(dm.train_examples) == 17 and dm.val_dataloader() == []
    loader = dm.train_dataloader()
    batches = list(loader)
    assert [len(b) for b in batches] == [4, 4, 4, 4, 1]  # drop_last=False
    assert all(isinstance(b, list) and all(isinstance(e, Example) for e in b) for b in batches)
    assert sorted(e.source for b in batches for e in b) == sorted(e.source for e in dm.train_examples)
    assert move_data_to_device(batches[0], "cpu") == batches[0]  # Lightning's transfer keeps the examples

    second = epoch_prompts(loader)
    again = SDFTDataModule(train_files=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], batch_size=4, seed=3)
    again.setup("fit")
    fresh = again.train_dataloader()
    assert epoch_prompts(fresh) == [[e.prompt for e in b] for b in batches]  # the same seed, the same order
    assert epoch_prompts(fresh) == second
    assert second != [[e.prompt for e in b] for b in batches]  # reshuffled each epoch


class RecordingModule(L.LightningModule):
    """Records (epoch, source) of every training example it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, str]] = []

    def training_step(self, batch: list[Example], batch_idx: int) -> torch.Tensor:
        self.seen += [(self.current_epoch, example.source) for example in batch]
        return self.weight.square().sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_a_trainer_sees_every_example_in_every_epoch(tmp_path):
    write_task_files("arithmetic", 10, 0, tmp_path / "a.jsonl")
    dm = SDFTDataModule(train_files=str(tmp_path / "a.jsonl"), batch_size=4)
    module = RecordingModule()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, dm)
    for epoch in range(2):
        assert sorted(s for e, s in module.seen if e == epoch) == sorted(e.source for e in dm.train_examples)


@pytest.mark.parametrize("setting, message", [(dict(batch_size=0), "data.batch_size must be >= 1, got 0"),
                                              (dict(num_workers=-1), "data.num_workers must be >= 0, got -1")])
def test_a_setting_out_of_range_is_one_line_naming_it(setting, message):
    with pytest.raises(LLMKitError) as e:
        SDFTDataModule(**{"batch_size": 4, **setting})
    assert str(e.value) == message


def test_datamodule_val_examples_keep_file_order(tmp_path):
    write_task_files("reverse", 5, 1, tmp_path / "val.jsonl")
    dm = SDFTDataModule(val_files=str(tmp_path / "val.jsonl"), batch_size=2)
    dm.setup("validate")
    assert [e.prompt for b in dm.val_dataloader() for e in b] == [e.prompt for e in make_examples("reverse", 5, 1)]
    with pytest.raises(LLMKitError, match="train_files is empty"):
        SDFTDataModule(val_files=str(tmp_path / "val.jsonl")).setup("fit")


@pytest.mark.parametrize("task", TASKS)
def test_tasks_are_deterministic_per_seed(task):
    assert make_examples(task, 20, 5) == make_examples(task, 20, 5)
    assert [e.prompt for e in make_examples(task, 20, 5)] != [e.prompt for e in make_examples(task, 20, 6)]


def test_task_answers_are_correct():
    for e in make_examples("arithmetic", 50, 0):
        a, b, total = map(int, re.fullmatch(r"(\d+) \+ (\d+) = (\d+)", e.demonstration).groups())
        assert 0 <= a <= 99 and 0 <= b <= 99 and total == a + b
        assert e.prompt == f"What is {a} + {b}?" and e.meta == {"task": "arithmetic", "answer": str(total)}
    for e in make_examples("reverse", 50, 0):
        word = e.prompt.removeprefix("Reverse the word: ")
        assert re.fullmatch(r"[a-z]{3,7}", word)
        assert e.demonstration == f"The reverse of {word} is {word[::-1]}" and e.meta["answer"] == word[::-1]
    for e in make_examples("upper", 50, 0):
        word = e.prompt.removeprefix("Write in capitals: ")
        assert re.fullmatch(r"[a-z]{3,7}", word)
        assert e.demonstration == f"In capitals, {word} is {word.upper()}" and e.meta["answer"] == word.upper()


def test_fact_tasks_teach_a_fixed_table_and_probe_its_facts():
    table = dict(fact_table("colors", 3))
    assert len(table) == FACTS_PER_TABLE and set(table.values()) <= set(FACTS["colors"][2])
    assert fact_table("colors", 3) == fact_table("colors", 3) and dict(fact_table("colors", 4)) != table
    examples = make_examples("colors", 500, 3)
    for e in examples:
        name = re.fullmatch(r"What color is the ([a-z]{4})\?", e.prompt).group(1)
        assert e.demonstration == f"The color is {table[name]}." and e.meta["answer"] == table[name]
    assert len({e.prompt for e in examples}) == FACTS_PER_TABLE  # 500 draws cover the table
    probes = make_probes("colors", 10, 3, {e.prompt for e in examples})
    assert [p["prompt"] for p in probes] == [f"What color is the {n}?" for n, _ in fact_table("colors", 3)[:10]]
    assert all(re.search(p["expect_regex"], f"The color is {table[p['prompt'][18:-1]]}.") for p in probes)
    with pytest.raises(LLMKitError, match="has 64 facts"):
        make_probes("cities", 65, 0, set())


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(LLMKitError, match="arithmetic, reverse, upper"):
        make_examples("sorting", 3, 0)


def test_probes_are_distinct_and_disjoint_from_training_prompts():
    train = make_examples("arithmetic", 3000, 0)
    probes = make_probes("arithmetic", 200, 0, {e.prompt for e in train})
    prompts = [p["prompt"] for p in probes]
    assert len(set(prompts)) == 200 and not set(prompts) & {e.prompt for e in train}
    every = {f"What is {a} + {b}?" for a in range(100) for b in range(100)}
    with pytest.raises(LLMKitError, match="found only 0 arithmetic probes"):
        make_probes("arithmetic", 5, 0, every)


def test_answer_regex_matches_the_exact_answer_only():
    regex = answer_regex("arithmetic", "82")
    assert regex == "(?<![0-9])82(?![0-9])"
    assert re.search(regex, "17 + 65 = 82.") and re.search(regex, "82")
    assert not re.search(regex, "= 182") and not re.search(regex, "= 821")
    assert re.search(answer_regex("reverse", "pmal"), "is pmal")
    assert not re.search(answer_regex("reverse", "pmal"), "is pmals")
    assert re.search(answer_regex("upper", "LAMP"), "is LAMP!") and not re.search(answer_regex("upper", "LAMP"), "lamp")


def test_data_tasks_command_writes_examples_and_probes(tmp_path, capsys):
    out, probes = tmp_path / "sub" / "train.jsonl", tmp_path / "probes.jsonl"
    code = main(["data", "tasks", "--task", "upper", "--n", "12", "--seed", "4", "--out", str(out),
                 "--probes-out", str(probes), "--n-probes", "5"])
    assert code == 0
    assert "12 upper examples" in capsys.readouterr().out
    examples = read_examples(out)
    assert examples == [Example(e.prompt, e.demonstration, e.meta, f"{out}:{i + 1}")
                        for i, e in enumerate(make_examples("upper", 12, 4))]
    records = [json.loads(line) for line in probes.read_text().splitlines()]
    assert [set(r) for r in records] == [{"name", "prompt", "expect_regex"}] * 5
    assert not {r["prompt"] for r in records} & {e.prompt for e in examples}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["probes.jsonl", "sub", "train.jsonl"]  # no temp files
    assert main(["data", "tasks", "--task", "upper", "--n", "0", "--out", str(out)]) == 1
    assert "must be >= 1" in capsys.readouterr().err
    # --n-probes alone was ignored
    assert main(["data", "tasks", "--task", "upper", "--n", "3", "--out", str(out), "--n-probes", "5"]) == 1
    assert capsys.readouterr().err == \
        "llmkit: error: --n-probes 5 needs --probes-out, the file to write the probes to\n"


def test_the_shipped_example_files_are_what_the_command_writes(tmp_path):
    shipped = Path(__file__).parent.parent / "configs" / "sdft"
    write_task_files("arithmetic", 40, 0, tmp_path / "ex.jsonl", tmp_path / "probes.jsonl", 20)
    for name, fresh in (("example_arithmetic.jsonl", "ex.jsonl"), ("example_arithmetic_probes.jsonl", "probes.jsonl")):
        assert (shipped / name).read_text() == (tmp_path / fresh).read_text()
    assert len(read_examples(shipped / "example_arithmetic.jsonl")) == 40
    assert len(read_probes(shipped / "example_arithmetic_probes.jsonl")) == 20


def test_data_tasks_streams_its_examples_and_writes_nothing_when_the_probes_fail(tmp_path):
    """Every example was held twice (the list and a set of its prompts): 1e6 examples took 1.4 GB,
    so a large --n ran out of memory. Now only the probe candidates are held."""
    import tracemalloc

    tracemalloc.start()
    counts = write_task_files("reverse", 30_000, 0, tmp_path / "ex.jsonl", tmp_path / "probes.jsonl", 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert counts == {"examples": 30_000, "probes": 20} and peak < 2e6, peak  # held, they took 20 MB
    lines = (tmp_path / "ex.jsonl").read_text().splitlines()
    assert len(lines) == 30_000 and json.loads(lines[-1])["prompt"] == make_examples("reverse", 30_000, 0)[-1].prompt
    train = {json.loads(line)["prompt"] for line in lines}
    assert [json.loads(line) for line in (tmp_path / "probes.jsonl").read_text().splitlines()] == \
        make_probes("reverse", 20, 0, train)
    # every arithmetic prompt is taught: the probes fail after the examples were generated, and neither file is left
    with pytest.raises(LLMKitError, match="found only 0 arithmetic probes"):
        write_task_files("arithmetic", 100_000, 0, tmp_path / "a.jsonl", tmp_path / "a_probes.jsonl", 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ex.jsonl", "probes.jsonl"]
