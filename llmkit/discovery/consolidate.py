"""Consolidation: turn what TTT-Discover found into SDFT examples.

A discovery run (``TTTDiscoverModule``) leaves ``result.json`` (with the problem's prompt as a
fresh model sees it) and ``archive.json`` (every kept state and its reward) in its output
directory. :func:`consolidate` makes SDFT JSONL lines from them, one per good state:

    {"prompt": <the problem's prompt>, "demonstration": <the state's text>,
     "problem": <environment name>, "reward": <its reward>, "run": <the run directory>}

A state qualifies if its reward is finite, at least ``min_reward`` and above the initial
state's (a state no better than the starting point teaches nothing); the ``top`` best of each
run are kept. ``llmkit sdft fit`` then trains on the file like on any other: what one problem
taught at test time becomes a skill the next model keeps.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from llmkit.errors import LLMKitError
from llmkit.io import read_json, unique_paths

_RUN_HINT = ("pass the output directory of an `llmkit ttt fit` run (its model.out_dir, or the run's log directory; "
             "a run writes result.json after its first step)")


def consolidate(run_dirs: list[str | Path], min_reward: float = -math.inf, top: int = 1) -> list[dict[str, Any]]:
    """SDFT examples from discovery runs (see the module docstring), best first within each run; a
    run given twice counts once."""
    if top < 1:
        raise LLMKitError(f"top (--top) must be >= 1, got {top}")
    if math.isnan(min_reward):
        raise LLMKitError("min_reward (--min-reward) must be a number, got nan")
    if not run_dirs:
        raise LLMKitError("no discovery runs given: pass the output directories of `llmkit ttt fit` runs")
    run_dirs = unique_paths(run_dirs)
    examples = []
    for run in run_dirs:
        result, archive = read_json(run / "result.json", _RUN_HINT), read_json(run / "archive.json", _RUN_HINT)
        try:
            prompt, problem, initial = result["prompt"], result["problem"], result["initial_reward"]
            states = archive["states"]
        except KeyError as e:
            raise LLMKitError(
                f"{run}: result.json or archive.json lacks {e}; was it written by `llmkit ttt fit`?"
            ) from None
        good = [s for s in states[1:] if math.isfinite(s["reward"]) and s["reward"] >= min_reward
                and s["reward"] > initial]
        for state in sorted(good, key=lambda s: (-s["reward"], s["id"]))[:top]:
            examples.append({"prompt": prompt, "demonstration": state["text"], "problem": problem,
                             "reward": state["reward"], "run": str(run)})
    if not examples:
        raise LLMKitError(
            f"no state in {len(run_dirs)} run(s) beats its initial state with reward >= {min_reward}: "
            "lower min_reward or run the discovery longer"
        )
    return examples
