"""``llmkit consolidate``: turn what TTT-Discover runs found into SDFT JSONL examples
(:func:`llmkit.discovery.consolidate.consolidate`).

:mod:`llmkit.discovery` (which imports torch) loads when the command runs, so ``--help`` is instant.
"""

from __future__ import annotations

import math
from pathlib import Path

from llmkit.io import refuse_overwrite, unique_paths, write_jsonl_atomic


def consolidate(run: list[Path], out: Path, min_reward: float = -math.inf, top: int = 1) -> int:
    """Turn TTT-Discover results into SDFT JSONL examples.

    Args:
        run: output directories of `llmkit ttt fit` runs (a run given twice counts once).
        out: the SDFT .jsonl file to write.
        min_reward: keep states scoring at least this.
        top: best states kept per run.
    """
    runs = unique_paths(run)
    inputs = {f"{name} of --run {path}": path / name for path in runs for name in ("result.json", "archive.json")}
    refuse_overwrite(out, "--out", inputs, "write the SDFT examples to another file")

    from llmkit.discovery.consolidate import consolidate as consolidate_runs

    examples = consolidate_runs(runs, min_reward, top)
    write_jsonl_atomic(out, examples)
    best = max(e["reward"] for e in examples)
    print(f"wrote {out}: {len(examples)} SDFT example{'s' if len(examples) != 1 else ''} from {len(runs)} run(s), "
          f"best reward {best:.6g}")
    return 0
