"""Evaluation: perplexity on packed shards, capability probes, and the JSON report that SDFT's
regression gates compare."""

from llmkit.eval.mode import eval_mode
from llmkit.eval.perplexity import evaluate_perplexity
from llmkit.eval.probes import Probe, read_probes, score_probes
from llmkit.eval.report import EvalConfig, evaluate

__all__ = [
    "EvalConfig", "Probe", "eval_mode", "evaluate", "evaluate_perplexity", "read_probes", "score_probes",
]
