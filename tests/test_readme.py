"""The README's "Using it" walkthrough, run verbatim as a bash script: the README cannot drift from
what the commands do (about a minute and a half on the 2-core CPU VM)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def walkthrough() -> str:
    """The first bash block under "## Using it"."""
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Using it", 1)[1]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


def test_the_walkthrough_is_there_and_runs_on_a_cpu():
    script = walkthrough()
    for command in ("data corpus", "data tokenizer", "data pack", "pretrain fit", "pretrain validate", "generate",
                    "data tasks", "sdft fit", "sdft validate", "sft fit", "ttt fit", "consolidate", "lora merge",
                    "convert to-hf"):
        assert f"llmkit {command}" in script, command
    assert "_gpu.yaml" not in script  # the GPU configs are in a block of their own


@pytest.mark.slow
def test_the_readme_walkthrough_runs_verbatim(tmp_path):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", walkthrough()], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Traceback" not in result.stderr

    assert torch.load(tmp_path / "lightning_logs/pretrain_tiny/version_0/checkpoints/last.ckpt",
                      weights_only=True)["global_step"] == 20
    completions = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert [c["prompt"] for c in completions] == ["def main(", "import os"]
    assert list((tmp_path / "lightning_logs/sdft_tiny/version_0/gates").glob("block_*/gate_decision.json"))
    found = [json.loads(line) for line in (tmp_path / "found.jsonl").read_text().splitlines()]
    assert found and all(f["reward"] > 0 for f in found)
    assert (tmp_path / "merged.ckpt").is_file()
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == [  # validations log into their runs
        "pretrain_tiny", "sdft_tiny", "sft_tiny", "ttt_toy"]
    said = result.stdout + result.stderr
    for line in ("logs: lightning_logs/pretrain_tiny/version_0", "checkpoint: lightning_logs/sdft_tiny/version_0",
                 "gate block 1 (steps 0-4)", "discovery step 4/4: best reward", "wrote merged.ckpt"):
        assert line in said, line


def test_every_test_the_docs_cite_exists():
    """docs/ and the README cite tests (and test modules) by name as evidence; a renamed test must take
    its citations along."""
    import re

    files = list((ROOT / "tests").glob("*.py"))
    defined = {f.stem for f in files} | {m for f in files for m in re.findall(r"^def (test_\w+)", f.read_text(), re.M)}
    cited = {(doc.name, name) for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
             for name in re.findall(r"\b(test_\w+)\b", doc.read_text(encoding="utf-8"))}
    assert sorted((doc, name) for doc, name in cited if name not in defined) == []
