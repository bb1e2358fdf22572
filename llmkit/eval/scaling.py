"""Scaling laws with breakpoints: a broken power law fitted to the validation losses of pretraining runs.

The law is a continuous piecewise power law, a straight line per segment in log-log space.
With y = log10(loss), x = log10(compute, parameters or tokens) and K breakpoints t_1 < ... < t_K::

    y = a + b_0 x + sum_k c_k max(0, x - t_k)

Segment j (between t_j and t_{j+1}) is the power law loss = 10^(a_j) * X^(b_j), whose slope b_j
= b_0 + c_1 + ... + c_j is the scaling exponent and whose intercept a_j = a - c_1 t_1 - ... -
c_j t_j is log10 loss at X = 1. For given breakpoints the coefficients are ordinary least
squares on the hinge basis (1, x, max(0, x - t_k)); searched breakpoints minimise the same
squared error in two stages: every combination of candidate positions (the interior distinct x
values and the midpoints between them, thinned evenly when the combinations would exceed
:data:`MAX_GRID_FITS`), then coordinate descent in which each breakpoint in turn moves to the
best position in the data intervals around it, found by golden-section search within each
interval (the error is a smooth function of t_k between data points, not across them).

Identifiability rule: every segment must hold at least two distinct x values (a point at a
breakpoint counts for both segments it joins), so the lines are determined; a searched fit with
K breakpoints needs at least 2(K + 1) distinct x values, two per segment, one more per
breakpoint than the K + 2 coefficients need, since the positions are fitted too. Repeated x
values are fine (repeated seeds, say); they count once.

This is the broken power law in the sense of a piecewise-linear fit in log-log space with sharp
breaks. Caballero et al. 2022, "Broken Neural Scaling Laws" (arXiv 2210.14891), is related work:
their BNSL has smooth transitions (a sharpness parameter per break) and a loss floor, neither of
which is fitted here.

A run directory is the TensorBoard log directory of ``llmkit pretrain fit`` (e.g.
``lightning_logs/pretrain_tiny/version_0``) or of ``bench/sweep.py``; see :func:`read_run` for what
is read from it.
"""

from __future__ import annotations

import glob
import itertools
import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.tensorflow_stub import errors, pywrap_tensorflow

from llmkit.data.packing import meta_path_for
from llmkit.errors import LLMKitError
from llmkit.io import atomic_file, yaml_error_summary
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer

Axis = Literal["compute", "params", "tokens"]
LossChoice = Literal["final", "best"]

AXIS_LABELS: dict[str, str] = {
    "compute": "training FLOPs", "params": "non-embedding parameters", "tokens": "training tokens",
}
"""What each x axis measures, for tables and plots."""

EVENT_FILES = "events.out.tfevents.*"
MAX_GRID_FITS = 20_000
"""Least-squares fits the coarse search may spend on combinations of candidate breakpoints."""
MODEL_SIZES = ("vocab_size", "n_layers", "d_model", "n_heads", "d_ff", "max_seq_len", "n_streams")
"""The keys a run's hparams.yaml ``config`` must give: the parameter count and FLOPs depend on them,
and ModelConfig's defaults for them (a 12-layer, 768-wide model) would count another model's."""
_GOLDEN = (math.sqrt(5) - 1) / 2
_MAX_SWEEPS = 50


@dataclass(frozen=True)
class RunPoint:
    """One run's point: its validation loss and how much training it took to get there.

    Attributes:
        run: the run's log directory.
        loss: val/loss in nats per token: the last one logged, or the lowest.
        step: the global step at which that val/loss was logged.
        tokens: training tokens seen by that step.
        params: non-embedding parameters of the model.
        flops: training FLOPs up to that step, ``Transformer.flops_per_token(seq_len) * tokens``.
        seq_len: the training window length the FLOPs were counted with.
        tokenizer: the ``tokenizer_sha256`` of the run's first training shard, when its metadata
            is still where the run's hparams.yaml says (None: unknown).
    """

    run: Path
    loss: float
    step: int
    tokens: float
    params: int
    flops: float
    seq_len: int
    tokenizer: str | None = None

    def x(self, axis: Axis) -> float:
        """The run's value on ``axis``: FLOPs (compute), non-embedding parameters or tokens."""
        return {"compute": self.flops, "params": float(self.params), "tokens": self.tokens}[axis]

    def to_dict(self) -> dict[str, Any]:
        return {"run": str(self.run), "loss": self.loss, "step": self.step, "tokens": self.tokens,
                "params": self.params, "flops": self.flops, "seq_len": self.seq_len, "tokenizer": self.tokenizer}


class _HparamsLoader(yaml.SafeLoader):
    """``yaml.safe_load`` plus ``!!python/tuple``, the one Python tag Lightning writes into an
    llmkit run's hparams.yaml (AdamW's betas); any other Python tag stays an error."""


_HparamsLoader.add_constructor(
    "tag:yaml.org,2002:python/tuple", lambda loader, node: tuple(loader.construct_sequence(node))
)


def _read_yaml(path: Path, run: Path) -> dict[str, Any]:
    try:
        value = yaml.load(path.read_text(encoding="utf-8"), Loader=_HparamsLoader)
    except UnicodeDecodeError as e:
        raise LLMKitError(f"run {run}: {path.name} is not UTF-8 ({e.reason}); restore the file") from None
    except yaml.YAMLError as e:
        raise LLMKitError(f"run {run}: {path.name} is not readable YAML ({yaml_error_summary(e)}); restore the file"
                          ) from None
    if not isinstance(value, dict):
        raise LLMKitError(f"run {run}: {path.name} is not a YAML mapping; restore the file")
    return value


def _positive_int(value: Any, run: Path, key: str) -> int:
    """``value``, read from ``key`` of ``run``'s files (``config.yaml data.seq_len``), when it is a
    positive integer; otherwise :class:`LLMKitError` naming the run and the key."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LLMKitError(
            f"run {run}: {key} is {value!r}; it must be a positive integer (or null for the model's max_seq_len): "
            "correct it or leave the run out"
        )
    return value


def _damage(path: Path) -> str | None:
    """What is wrong with the TensorBoard event file ``path``, if anything: a record cut off at its end
    (a run still writing it, or a write or copy cut short) or one failing its checksum (or no event
    file at all). EventAccumulator stops reading a file there without a word, as if it ended."""
    reader = pywrap_tensorflow.PyRecordReader_New(str(path))
    try:
        while True:
            reader.GetNext()
    except errors.OutOfRangeError:  # the end of the file, after whole records
        return None
    except errors.DataLossError as e:
        if "truncated" in str(e):
            return "its last record is cut off: a run still writing it, or a write or copy cut short"
        return "a record fails its checksum: the file is damaged"


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """The run directories named by ``paths``: a directory holding TensorBoard event files is a
    run; one holding none is searched below for run directories (so the parent of many runs,
    such as ``bench/sweep.py``'s ``WORK/runs``, names them all, in sorted order). A path that
    is not a directory, or with no event files in or below it, raises :class:`LLMKitError`."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise LLMKitError(f"run {path} is not a directory: give a TensorBoard log directory of a pretraining run")
        if any(path.glob(EVENT_FILES)):
            found = [path]
        else:
            found = sorted({f.parent for f in path.rglob(EVENT_FILES)})
        if not found:
            raise LLMKitError(
                f"run {path}: no TensorBoard event files ({EVENT_FILES}) in it or below it; give the log directory "
                "of a pretraining run, e.g. lightning_logs/pretrain_tiny/version_0"
            )
        runs += [run for run in found if run not in runs]
    return runs


def _tokens_at(step: int, steps: np.ndarray, tokens: np.ndarray) -> float:
    """Training tokens seen by ``step``, from train/tokens logged at ``steps``: interpolated
    between logged steps, extended past them at the run's mean tokens per step (constant at a
    fixed batch size, so exact when validation falls between two logged steps)."""
    if len(steps) > 1:
        rate = (tokens[-1] - tokens[0]) / (steps[-1] - steps[0])
    else:
        rate = tokens[0] / (steps[0] + 1)  # step s is the (s + 1)-th optimizer step
    if step >= steps[-1]:
        return float(tokens[-1] + rate * (step - steps[-1]))
    if step <= steps[0]:
        return float(max(0.0, tokens[0] - rate * (steps[0] - step)))
    return float(np.interp(step, steps, tokens))


def read_run(run: str | Path, loss: LossChoice = "final") -> RunPoint:
    """The point of one run: its validation loss, tokens, parameters and FLOPs.

    From ``run``'s TensorBoard event files: the ``val/loss`` scalar (``final``: the one logged
    last, at the highest step; ``best``: the lowest finite one) and the training tokens of the
    weights it scored: the ``val/tokens`` logged with it, or in runs from before that was logged,
    the ``train/tokens`` scalar (cumulative) at that val/loss's step, interpolated between logged
    steps and extended past the last at the run's mean rate (which counts a step too many for a
    ``validate``, logged at the weights' step where fit's validations sit one before). From
    ``hparams.yaml``: ``config``, the :class:`ModelConfig` of the model, built on the meta device
    (no memory, no weights) to count its non-embedding parameters and its FLOPs per token. The
    window length for the FLOPs is, in order: ``data.seq_len`` of the ``config.yaml`` that
    LightningCLI saves beside hparams.yaml; the data module's ``seq_len`` that the Trainer logs
    into hparams.yaml with the model's (a run trained in Python, such as ``bench/sweep.py``'s);
    the model's ``max_seq_len`` when neither is there or the value is null (as
    ``PackedDataModule`` reads a null seq_len).

    A damaged event file, which EventAccumulator reads as far as the damage without a word, is
    named: in a warning when val/loss was read (from before the damage, or another file), else in
    the error. Raises :class:`LLMKitError` naming the run when it has no event files, no val/loss,
    neither val/tokens at the selected step nor train/tokens, a non-finite selected loss, an
    ``init_ckpt`` in hparams.yaml (a continued run: not a point of the law), no readable
    hparams.yaml with a ``config`` entry giving every key of :data:`MODEL_SIZES`, or a window
    length that is not a positive integer.
    """
    run = Path(run)
    if not run.is_dir() or not any(run.glob(EVENT_FILES)):
        raise LLMKitError(
            f"run {run}: no TensorBoard event files ({EVENT_FILES}); give the log directory of a pretraining run, "
            "e.g. lightning_logs/pretrain_tiny/version_0"
        )
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    val = [(e.step, e.value) for e in events.Scalars("val/loss")] if "val/loss" in scalars else []
    damaged = next(((f, why) for f in sorted(run.glob(EVENT_FILES)) if (why := _damage(f))), None)
    if damaged is not None and not val:
        raise LLMKitError(
            f"run {run}: TensorBoard event file {damaged[0].name} cannot be read to its end ({damaged[1]}) and no "
            "val/loss was read before that; restore the file or leave the run out"
        )
    if damaged is not None:  # a resumed run's later file, say: its validations would be missed without a word
        warnings.warn(f"run {run}: TensorBoard event file {damaged[0].name} cannot be read to its end ({damaged[1]}): "
                      "what it logged after that is not read, so this run's point comes from the val/loss logged "
                      "before it; restore the file or leave the run out", stacklevel=2)
    if not val:  # a tag whose points a resume's purge_step hid has none left
        raise LLMKitError(
            f"run {run}: no val/loss scalar in its TensorBoard events, so it never validated; give it val_files "
            "and let it reach a validation (val_check_interval), or leave it out"
        )
    if loss == "final":
        step = max(s for s, _ in val)
        value = [v for s, v in val if s == step][-1]  # a step validated twice: its last value
        if not math.isfinite(value):
            raise LLMKitError(
                f"run {run}: the final val/loss (step {step}) is {value}: the run diverged; fit its lowest finite "
                "loss instead (loss 'best') or leave the run out"
            )
    else:
        finite = [e for e in val if math.isfinite(e[1])]
        if not finite:
            raise LLMKitError(f"run {run}: every val/loss is non-finite: the run diverged; leave it out")
        step, value = min(finite, key=lambda e: e[1])
    validated = {e.step: e.value for e in events.Scalars("val/tokens")} if "val/tokens" in scalars else {}
    if step in validated:
        tokens = validated[step]
    else:
        logged: dict[int, float] = {}
        for e in events.Scalars("train/tokens") if "train/tokens" in scalars else []:
            logged[e.step] = e.value  # a step logged twice keeps its last value
        if not logged:
            raise LLMKitError(
                f"run {run}: its val/loss at step {step} has no val/tokens beside it and the run logged no "
                "train/tokens scalar (PretrainModule logs it every log_every_n_steps steps); validate it again "
                "with llmkit's PretrainModule, or leave it out"
            )
        steps = sorted(logged)
        tokens = _tokens_at(step, np.array(steps, dtype=float), np.array([logged[s] for s in steps]))

    hparams_file = run / "hparams.yaml"
    if not hparams_file.is_file():
        raise LLMKitError(
            f"run {run}: no hparams.yaml (the TensorBoardLogger writes it with the model's config); the parameter "
            "count and FLOPs need it: restore it or leave the run out"
        )
    hparams = _read_yaml(hparams_file, run)
    if not isinstance(hparams.get("config"), dict):
        raise LLMKitError(
            f"run {run}: hparams.yaml has no 'config' mapping (the ModelConfig PretrainModule saves); is it a "
            "llmkit pretraining run?"
        )
    if hparams.get("init_ckpt"):  # its config is the one given, not the checkpoint's shape the run trained
        raise LLMKitError(
            f"run {run}: it continued from init_ckpt {hparams['init_ckpt']}, whose training its val/loss owes to and "
            "its tokens and FLOPs leave out: it is no point of a scaling law; fit runs trained from scratch"
        )
    try:
        config = ModelConfig.from_dict(hparams["config"])
    except LLMKitError as e:
        raise LLMKitError(f"run {run}: hparams.yaml config: {e}") from None
    if missing := [key for key in MODEL_SIZES if key not in hparams["config"]]:
        raise LLMKitError(
            f"run {run}: hparams.yaml config gives no {', '.join(missing)}: the parameter count and FLOPs need the "
            "model's sizes (PretrainModule saves them all); restore the file or leave the run out"
        )
    with torch.device("meta"):
        model = Transformer(config)
    seq_len, key = hparams.get("seq_len"), "hparams.yaml seq_len"
    cli_config = _read_yaml(run / "config.yaml", run) if (run / "config.yaml").is_file() else {}
    data = cli_config.get("data")
    if isinstance(data, dict) and "seq_len" in data:
        seq_len, key = data["seq_len"], "config.yaml data.seq_len"
    seq_len = config.max_seq_len if seq_len is None else _positive_int(seq_len, run, key)
    tokenizer = _shard_tokenizer(hparams.get("train_files"), _launch_directory(run, cli_config))
    return RunPoint(run=run, loss=float(value), step=int(step), tokens=tokens,
                    params=model.num_params(non_embedding=True), flops=model.flops_per_token(seq_len) * tokens,
                    seq_len=seq_len, tokenizer=tokenizer)


def _launch_directory(run: Path, cli_config: dict[str, Any]) -> Path | None:
    """The directory the run was launched from, where its relative paths start, as its config.yaml
    tells: the run is SAVE_DIR/NAME/version_N below it for a TensorBoardLogger whose save_dir is
    relative (Lightning's default logger: DEFAULT_ROOT_DIR/lightning_logs/version_N); None where
    the config does not tell (no config.yaml, an absolute directory, another logger)."""
    trainer = cli_config.get("trainer")
    trainer = trainer if isinstance(trainer, dict) else {}
    logger = trainer.get("logger")
    if isinstance(logger, dict) and str(logger.get("class_path", "")).endswith("TensorBoardLogger"):
        args = logger.get("init_args") if isinstance(logger.get("init_args"), dict) else {}
        save_dir, name = args.get("save_dir"), args.get("name", "lightning_logs")
    elif logger in (None, True) and "logger" in trainer:
        save_dir, name = trainer.get("default_root_dir") or ".", "lightning_logs"
    else:
        return None
    if not isinstance(save_dir, str) or Path(save_dir).is_absolute() or not isinstance(name, str):
        return None
    depth = len(Path(save_dir).parts) + len(Path(name).parts) + 1  # the run's own directory, version_N
    parents = Path(run).resolve().parents
    return parents[depth - 1] if depth <= len(parents) else None


def _shard_tokenizer(train_files: Any, launched_from: Path | None) -> str | None:
    """The ``tokenizer_sha256`` in the metadata of the first shard that ``train_files`` (a run's
    data module argument, as hparams.yaml holds it: a path, a pattern, or a list of them) names,
    or None where that metadata cannot be read. A relative path is read from ``launched_from``,
    the run's launch directory, or from here where that is not known."""
    first = train_files[0] if isinstance(train_files, list) and train_files else train_files
    if not isinstance(first, str):
        return None
    base = launched_from or Path.cwd()
    shards = sorted(glob.glob(first, root_dir=base)) or [first]
    try:
        return json.loads(meta_path_for(base / shards[0]).read_text(encoding="utf-8")).get("tokenizer_sha256")
    except (OSError, ValueError, AttributeError):
        return None


def read_runs(paths: Sequence[str | Path], loss: LossChoice = "final") -> list[RunPoint]:
    """:func:`read_run` on every run :func:`find_runs` finds in ``paths``; runs whose shards came
    from different tokenizers are refused: a loss in nats per token of one tokenizer is not
    comparable with another's."""
    points = [read_run(run, loss) for run in find_runs(paths)]
    first_with: dict[str, Path] = {}
    for point in points:
        if point.tokenizer is not None:
            first_with.setdefault(point.tokenizer, point.run)
    if len(first_with) > 1:
        (a, run_a), (b, run_b) = list(first_with.items())[:2]
        raise LLMKitError(
            f"runs {run_a} and {run_b} trained on shards of different tokenizers (sha256 {a[:12]} and {b[:12]}): "
            "their losses, in nats per token, are not comparable; fit each tokenizer's runs apart"
        )
    return points


@dataclass(frozen=True)
class Segment:
    """One power law of a fit: loss = 10^intercept * X^slope between ``start`` and ``end``.

    Attributes:
        start: where it starts, in the units of x: the smallest x fitted, or a breakpoint.
        end: where it ends: a breakpoint, or the largest x fitted.
        slope: the scaling exponent (d log10 loss / d log10 x).
        intercept: log10 loss of the segment's line at x = 1.
    """

    start: float
    end: float
    slope: float
    intercept: float


@dataclass(frozen=True)
class BreakpointScalingLaw:
    """A continuous piecewise power law, fitted in log10-log10 space (see the module docstring).

    Attributes:
        intercept: a, log10 loss of the first segment's line at x = 1.
        slope: b_0, the first segment's slope.
        changes: c_k, the change of slope at each breakpoint.
        log_breaks: t_k, the breakpoints as log10 x, increasing.
        log_x_range: log10 of the smallest and largest x fitted.
        rmse: root mean squared residual of the fit, in log10 loss.
        n_points: points fitted.
    """

    intercept: float
    slope: float
    changes: tuple[float, ...]
    log_breaks: tuple[float, ...]
    log_x_range: tuple[float, float]
    rmse: float
    n_points: int

    @classmethod
    def fit(
        cls, x: Sequence[float] | np.ndarray, loss: Sequence[float] | np.ndarray, breaks: int = 1,
        positions: Sequence[float] | None = None,
    ) -> BreakpointScalingLaw:
        """The least-squares law with ``breaks`` breakpoints through the points (x, loss), both in
        their own units (x > 0, loss > 0, finite); the same as :func:`fit_breakpoint`."""
        return fit_breakpoint(x, loss, breaks, positions)

    @property
    def breaks(self) -> tuple[float, ...]:
        """The breakpoints in the units of x."""
        return tuple(10.0**t for t in self.log_breaks)

    def segments(self) -> list[Segment]:
        """One :class:`Segment` per power law, in increasing x."""
        slopes = self.slope + np.concatenate(([0.0], np.cumsum(self.changes)))
        intercepts = self.intercept - np.concatenate(([0.0], np.cumsum(np.multiply(self.changes, self.log_breaks))))
        edges = (self.log_x_range[0], *self.log_breaks, self.log_x_range[1])
        return [Segment(10.0 ** edges[j], 10.0 ** edges[j + 1], float(slopes[j]), float(intercepts[j]))
                for j in range(len(slopes))]

    def predict(self, x: float | Sequence[float] | np.ndarray) -> float | np.ndarray:
        """The loss at ``x`` (> 0, in the units fitted), a float for a float; beyond the data the
        end segments' power laws continue. With every slope <= 0 it never increases with x."""
        lx = np.log10(np.asarray(x, dtype=float))
        y = _design(lx, self.log_breaks) @ np.array([self.intercept, self.slope, *self.changes])
        loss = 10.0**y
        return float(loss) if np.ndim(loss) == 0 else loss

    def to_dict(self) -> dict[str, Any]:
        """The fit as plain JSON values: breakpoints and segments in the units of x."""
        return {
            "breaks": list(self.breaks),
            "segments": [vars(s) for s in self.segments()],
            "rmse_log10": self.rmse,
            "n_points": self.n_points,
            "log10": {"intercept": self.intercept, "slope": self.slope, "changes": list(self.changes),
                      "breaks": list(self.log_breaks)},
        }


def _design(x: np.ndarray, t: Sequence[float]) -> np.ndarray:
    """The hinge basis at x: columns 1, x, max(0, x - t_k)."""
    x = np.asarray(x, dtype=float)
    return np.stack([np.ones_like(x), x, *(np.maximum(0.0, x - tk) for tk in t)], axis=-1)


def _lstsq(x: np.ndarray, y: np.ndarray, t: Sequence[float]) -> tuple[np.ndarray, float]:
    """Least-squares coefficients (a, b_0, c_1..c_K) for breakpoints t, and the squared error."""
    design = _design(x, t)
    coef = np.linalg.lstsq(design, y, rcond=None)[0]
    residual = y - design @ coef
    return coef, float(residual @ residual)


def _short_segment(distinct: np.ndarray, t: Sequence[float]) -> int | None:
    """The first segment (0-based) holding fewer than two distinct x values, or None."""
    edges = (-np.inf, *t, np.inf)
    for j in range(len(edges) - 1):
        if np.count_nonzero((distinct >= edges[j]) & (distinct <= edges[j + 1])) < 2:
            return j
    return None


def _golden(f: Callable[[float], float], lo: float, hi: float, tol: float) -> tuple[float, float]:
    """Golden-section search for the minimum of ``f`` on [lo, hi], its ends included."""
    a, b = lo, hi
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = f(d)
    return min(((c, fc), (d, fd), (lo, f(lo)), (hi, f(hi))), key=lambda p: p[1])


def _search(x: np.ndarray, y: np.ndarray, distinct: np.ndarray, k: int) -> tuple[float, ...]:
    """Breakpoints minimising the squared error: a search over combinations of candidate positions,
    then coordinate descent by golden-section search within the data intervals around each."""

    def sse(t: Sequence[float]) -> float:
        return math.inf if _short_segment(distinct, t) is not None else _lstsq(x, y, t)[1]

    candidates = np.sort(np.concatenate((distinct[1:-1], (distinct[:-1] + distinct[1:]) / 2)))
    n = len(candidates)
    while n > k and math.comb(n, k) > MAX_GRID_FITS:
        n -= 1
    candidates = candidates[np.unique(np.linspace(0, len(candidates) - 1, n).round().astype(int))]
    best = min(itertools.combinations(candidates, k), key=sse)
    t, error = list(best), sse(best)
    tol = 1e-12 * max(1.0, float(distinct[-1] - distinct[0]))
    for _ in range(_MAX_SWEEPS):
        before = error
        for j in range(k):
            i = int(np.searchsorted(distinct, t[j]))
            lower = t[j - 1] if j > 0 else distinct[0]
            upper = t[j + 1] if j + 1 < k else distinct[-1]
            for lo, hi in itertools.pairwise(distinct[max(0, i - 2) : i + 2]):
                lo, hi = max(lo, lower), min(hi, upper)
                if hi <= lo:
                    continue
                position, value = _golden(lambda s, j=j: sse([*t[:j], s, *t[j + 1 :]]), lo, hi, tol)
                if value < error:
                    t[j], error = position, value
        if before - error <= 1e-15 * max(before, 1e-300):
            break
    return tuple(float(v) for v in t)


def min_distinct_x(breaks: int, searched: bool) -> tuple[int, str]:
    """The fewest distinct x values that can determine a fit with ``breaks`` breakpoints, and
    why: two per segment when the positions are searched too, one per coefficient when given
    (the module docstring's identifiability rule)."""
    return (2 * (breaks + 1), "two per segment") if searched else (breaks + 2, "one per coefficient")


def fit_breakpoint(
    x: Sequence[float] | np.ndarray, loss: Sequence[float] | np.ndarray, breaks: int = 1,
    positions: Sequence[float] | None = None,
) -> BreakpointScalingLaw:
    """Fit a continuous piecewise power law with ``breaks`` breakpoints to the points (x, loss).

    x and loss are in their own units (FLOPs, parameters or tokens; nats), positive and finite;
    the fit is least squares in log10-log10 space (module docstring). ``positions``: the
    breakpoints in the units of x, fixed instead of searched; their number must equal
    ``breaks``. Every segment needs two distinct x values (a point at a breakpoint counts for
    both segments), and a searched fit at least 2 * (breaks + 1) distinct x values in all;
    otherwise :class:`LLMKitError` says what is short.
    """
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(loss, dtype=float).ravel()
    if x.shape != y.shape:
        raise LLMKitError(f"x and loss must have the same length, got {x.size} and {y.size}")
    if breaks < 0:
        raise LLMKitError(f"breaks must be >= 0, got {breaks}")
    bad = ~(np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0))
    if bad.any():
        i = int(np.argmax(bad))
        raise LLMKitError(f"point {i} (x={x[i]}, loss={y[i]}): x and loss must be positive and finite for a log fit")
    lx, ly = np.log10(x), np.log10(y)
    distinct = np.unique(lx)
    if positions is None:
        need, rule = min_distinct_x(breaks, searched=True)
        if len(distinct) < need:
            raise LLMKitError(
                f"{len(distinct)} distinct x value(s): a fit with {breaks} searched breakpoint(s) needs at least "
                f"{need} ({rule}); add points or fit fewer breakpoints"
            )
        t = _search(lx, ly, distinct, breaks) if breaks else ()
    else:
        if len(positions) != breaks:
            raise LLMKitError(f"positions gives {len(positions)} breakpoint(s) but breaks is {breaks}: make them agree")
        if any(not (math.isfinite(p) and p > 0) for p in positions):
            raise LLMKitError(f"breakpoint positions {list(positions)} must be positive and finite")
        t = tuple(sorted(math.log10(p) for p in positions))
        short = _short_segment(distinct, t)
        if short is not None:
            raise LLMKitError(
                f"breakpoints {sorted(positions)} leave segment {short + 1} with fewer than two distinct x values "
                f"(the x values run from {x.min():.4g} to {x.max():.4g}); move the breakpoints between the points"
            )
    coef, error = _lstsq(lx, ly, t)
    return BreakpointScalingLaw(
        intercept=float(coef[0]), slope=float(coef[1]), changes=tuple(float(c) for c in coef[2:]), log_breaks=t,
        log_x_range=(float(distinct[0]), float(distinct[-1])), rmse=math.sqrt(error / len(lx)), n_points=len(lx),
    )


def fit_runs(
    points: Sequence[RunPoint], axis: Axis = "compute", breaks: int = 1, positions: Sequence[float] | None = None,
) -> BreakpointScalingLaw:
    """:func:`fit_breakpoint` on the runs' (x on ``axis``, loss), with the errors naming the runs:
    a run whose x is not positive, or too few distinct x values for ``breaks`` (2 * (breaks + 1)
    for a search, as :func:`fit_breakpoint` says)."""
    for p in points:
        if not p.x(axis) > 0:
            raise LLMKitError(f"run {p.run}: its {AXIS_LABELS[axis]} is {p.x(axis)}; a log-log fit needs it positive")
    distinct = len({p.x(axis) for p in points})
    need, rule = min_distinct_x(breaks, searched=positions is None)
    if distinct < need:
        named = f" ({points[0].run})" if len(points) == 1 else ""
        raise LLMKitError(
            f"{len(points)} run(s){named} give {distinct} distinct value(s) of {AXIS_LABELS[axis]}; a fit with "
            f"{breaks} breakpoint(s) needs at least {need} ({rule}): add runs or fit fewer breakpoints"
        )
    return fit_breakpoint([p.x(axis) for p in points], [p.loss for p in points], breaks, positions)


def plot(law: BreakpointScalingLaw, points: Sequence[tuple[float, float]], path: str | Path,
         x_label: str = "x") -> Path:
    """Write a log-log PNG of ``points`` ((x, loss) pairs), the fitted law and its breakpoints to
    ``path`` (through a temp file and a rename). Needs matplotlib: ``pip install 'llmkit[plot]'``."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import FormatStrFormatter
    except ImportError:
        raise LLMKitError(
            f"plotting {path} needs matplotlib: pip install 'llmkit[plot]' (or pip install matplotlib)"
        ) from None
    path = Path(path)
    xs = np.array([p[0] for p in points], dtype=float)
    losses = np.array([p[1] for p in points], dtype=float)
    lo, hi = law.log_x_range
    margin = 0.05 * max(hi - lo, 1e-6)
    grid = np.logspace(lo - margin, hi + margin, 400)
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(xs, losses, color="tab:blue", zorder=3, label="runs")
    slopes = ", ".join(f"{s.slope:.3f}" for s in law.segments())
    ax.plot(grid, law.predict(grid), color="tab:orange", label=f"fit (slopes {slopes})")
    for i, b in enumerate(law.breaks):
        ax.axvline(b, color="gray", linestyle="--", linewidth=1, label="breakpoint" if i == 0 else None)
    ax.set_xscale("log")
    ax.set_yscale("log")
    for formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        formatter(FormatStrFormatter("%g"))  # losses span less than a decade: plain numbers, not 4x10^0
    ax.set_xlabel(x_label)
    ax.set_ylabel("validation loss (nats/token)")
    ax.legend()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path
