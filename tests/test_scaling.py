"""Scaling laws with breakpoints: the fit, the run reader, `llmkit scaling fit` and bench/sweep.py."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils.tensorboard import SummaryWriter

from llmkit.cli import main
from llmkit.errors import LLMKitError
from llmkit.eval.scaling import BreakpointScalingLaw, _tokens_at, fit_breakpoint, fit_runs, plot, read_run, read_runs
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer

CONFIG = ModelConfig(vocab_size=256, n_layers=2, d_model=32, n_heads=4, d_ff=64, max_seq_len=128, n_streams=2)


def broken_power_law(x: np.ndarray, scale: float, slopes: tuple[float, float], at: float) -> np.ndarray:
    """loss = scale * (x / at)^slope_1 below ``at``, ^slope_2 above: continuous at ``at``."""
    x = np.asarray(x, dtype=float)
    return scale * (x / at) ** np.where(x < at, slopes[0], slopes[1])


# ---------------------------------------------------------------- the fit


@pytest.mark.parametrize("at", [3.3e14, 1e15, 7.7e16])
def test_a_two_segment_power_law_is_recovered_exactly(at):
    x = np.logspace(12.1, 18.3, 11)  # the break falls between points, or (1e15: no) on none of them
    law = fit_breakpoint(x, broken_power_law(x, 3.0, (-0.05, -0.3), at), breaks=1)
    first, second = law.segments()
    assert law.breaks[0] == pytest.approx(at, rel=1e-6)  # the issue asks 1%
    assert first.slope == pytest.approx(-0.05, rel=1e-6) and second.slope == pytest.approx(-0.3, rel=1e-6)
    assert first.intercept == pytest.approx(math.log10(3.0) + 0.05 * math.log10(at), abs=1e-6)
    assert second.intercept == pytest.approx(math.log10(3.0) + 0.3 * math.log10(at), abs=1e-6)
    assert (first.start, first.end, second.end) == pytest.approx((x[0], at, x[-1]), rel=1e-6)
    assert law.rmse < 1e-9 and law.n_points == 11
    assert BreakpointScalingLaw.fit(x, broken_power_law(x, 3.0, (-0.05, -0.3), at)) == law


def test_two_breakpoints_repeated_x_and_given_positions():
    lx = np.repeat(np.linspace(12, 19, 15), 2)  # every x twice, as two seeds would give
    y = 1.0 - 0.02 * lx - 0.1 * np.maximum(0, lx - 13.7) - 0.2 * np.maximum(0, lx - 16.2)
    law = fit_breakpoint(10**lx, 10**y, breaks=2)
    assert law.log_breaks == pytest.approx((13.7, 16.2), abs=1e-6)
    assert [s.slope for s in law.segments()] == pytest.approx([-0.02, -0.12, -0.32], abs=1e-6)
    fixed = fit_breakpoint(10**lx, 10**y, breaks=2, positions=[10**16.2, 10**13.7])
    assert fixed.log_breaks == pytest.approx((13.7, 16.2)) and fixed.rmse < 1e-12
    single = fit_breakpoint(10**lx, 10**y, breaks=0)
    assert len(single.segments()) == 1 and single.breaks == ()
    assert single.rmse == pytest.approx(np.std(y - np.polyval(np.polyfit(lx, y, 1), lx)), rel=1e-9)


def test_predictions_follow_the_segments_and_never_rise_when_every_slope_is_negative():
    rng = np.random.default_rng(0)
    x = 10 ** rng.uniform(12, 18, 40)
    noisy = broken_power_law(x, 3.0, (-0.05, -0.3), 1e15) * np.exp(rng.normal(0, 0.01, 40))
    law = fit_breakpoint(x, noisy, breaks=1)
    assert all(s.slope <= 0 for s in law.segments())
    assert law.breaks[0] == pytest.approx(1e15, rel=0.1)
    grid = np.logspace(10, 20, 2001)  # beyond the data on both sides too
    predicted = law.predict(grid)
    assert np.all(np.diff(predicted) <= 0) and np.all(predicted > 0)
    for s in law.segments():  # each segment's power law is the prediction inside it, and they meet at the break
        for at in (s.start, s.end, math.sqrt(s.start * s.end)):
            assert law.predict(at) == pytest.approx(10**s.intercept * at**s.slope, rel=1e-9)
    assert isinstance(law.predict(1e15), float) and law.predict([1e15, 1e16]).shape == (2,)


@pytest.mark.parametrize("x, breaks, positions, message", [
    ([1e12, 1e13, 1e14], 1, None, "3 distinct x value(s): a fit with 1 searched breakpoint(s) needs at least 4"),
    ([1e12] * 5, 0, None, "1 distinct x value(s): a fit with 0 searched breakpoint(s) needs at least 2"),
    ([1e12, 1e13, 1e14, 1e15], 1, [1e11], "leave segment 1 with fewer than two distinct x values"),
    ([1e12, 1e13, 1e14, 1e15], 2, [1e13], "positions gives 1 breakpoint(s) but breaks is 2"),
    ([1e12, 0.0, 1e14, 1e15], 1, None, "point 1 (x=0.0, loss=4.0): x and loss must be positive and finite"),
    ([1e12, 1e13, 1e14, 1e15], -1, None, "breaks must be >= 0"),
])
def test_a_fit_without_enough_points_or_with_bad_values_is_refused(x, breaks, positions, message):
    with pytest.raises(LLMKitError) as e:
        fit_breakpoint(x, [4.0] * len(x), breaks, positions)
    assert message in str(e.value)


def test_plot_writes_a_png_in_place_and_says_how_to_install_matplotlib(tmp_path, monkeypatch):
    x = np.logspace(12, 18, 8)
    loss = broken_power_law(x, 3.0, (-0.05, -0.3), 1e15)
    law = fit_breakpoint(x, loss)
    path = plot(law, list(zip(x, loss, strict=True)), tmp_path / "law.png", "FLOPs")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["law.png"]  # no temp file left behind
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    with pytest.raises(LLMKitError, match=r"pip install 'llmkit\[plot\]'"):
        plot(law, [(1e12, 3.0)], tmp_path / "again.png")
    assert not (tmp_path / "again.png").exists()


# ---------------------------------------------------------------- reading runs


def write_run(
    run: Path, val: list[tuple[int, float]] | None, tokens: list[tuple[int, float]] | None,
    config: ModelConfig | None = CONFIG, hparams_seq_len: int | None = None, cli_seq_len: object = "absent",
    train_files: str | None = None, val_tokens: list[tuple[int, float]] | None = None,
) -> Path:
    """A run directory as `llmkit pretrain fit` leaves it: TensorBoard events, hparams.yaml (with
    the tuple tag Lightning writes for AdamW's betas) and, when ``cli_seq_len`` is given, the
    config.yaml that LightningCLI saves."""
    writer = SummaryWriter(str(run))
    for step, value in val or []:
        writer.add_scalar("val/loss", value, step)
    for step, value in tokens or []:
        writer.add_scalar("train/tokens", value, step)
    for step, value in val_tokens or []:
        writer.add_scalar("val/tokens", value, step)
    writer.add_scalar("train/loss", 5.0, 0)
    writer.close()
    if config is not None:
        hparams = {"config": config.to_dict(), "seq_len": hparams_seq_len, "train_files": train_files}
        text = yaml.safe_dump(hparams) + "optim:\n  betas: !!python/tuple\n  - 0.9\n  - 0.95\n"
        (run / "hparams.yaml").write_text(text)
    if cli_seq_len != "absent":
        (run / "config.yaml").write_text(yaml.safe_dump({"data": {"seq_len": cli_seq_len, "batch_size": 8}}))
    return run


def test_a_run_gives_its_loss_tokens_parameters_and_flops(tmp_path):
    run = write_run(tmp_path / "run", val=[(9, 5.5), (19, 5.0), (24, 5.2)],
                    tokens=[(9, 2560.0), (19, 5120.0)], hparams_seq_len=32)
    final, best = read_run(run), read_run(run, loss="best")
    assert (final.loss, final.step, best.loss, best.step) == pytest.approx((5.2, 24, 5.0, 19))
    # validation at step 24 falls past the last logged train/tokens: extended at 256 tokens per step
    assert final.tokens == 6400 and best.tokens == 5120
    params = Transformer(CONFIG).num_params(non_embedding=True)
    assert final.params == params and final.seq_len == 32
    assert final.flops == pytest.approx((6 * params + 12 * 2 * 32 * 32) * 6400)
    assert final.x("compute") == final.flops and final.x("params") == params and final.x("tokens") == 6400


def test_a_run_shorter_than_log_every_n_steps_is_read_from_its_val_tokens(tmp_path):
    """A run that validated before it logged train/tokens (2 steps, log_every_n_steps 10): the
    tokens logged with its val/loss are all the point needs."""
    run = write_run(tmp_path / "run", val=[(1, 6.0)], tokens=None, val_tokens=[(1, 1024.0)], hparams_seq_len=32)
    point = read_run(run)
    assert (point.loss, point.step, point.tokens) == (6.0, 1, 1024.0)


def test_a_run_between_logged_steps_and_before_the_first():
    steps, tokens = np.array([9.0, 19.0]), np.array([2560.0, 5120.0])
    assert _tokens_at(14, steps, tokens) == 3840 and _tokens_at(4, steps, tokens) == 1280
    assert _tokens_at(30, np.array([9.0]), np.array([2560.0])) == 31 * 256  # one logged step: its rate


@pytest.mark.parametrize("cli_seq_len, hparams_seq_len, expected", [
    ("absent", 32, 32),  # a run trained in Python: the data module's seq_len in hparams.yaml
    (64, 32, 64),  # LightningCLI's config.yaml wins
    (None, 32, 128),  # data.seq_len: null means the model's max_seq_len
    ("absent", None, 128),  # nothing says: the model's max_seq_len
])
def test_the_flops_window_comes_from_config_yaml_then_hparams_then_the_context(
        tmp_path, cli_seq_len, hparams_seq_len, expected):
    run = write_run(tmp_path / "run", [(3, 5.0)], [(3, 512.0)], hparams_seq_len=hparams_seq_len,
                    cli_seq_len=cli_seq_len)
    assert read_run(run).seq_len == expected


@pytest.mark.parametrize("make, loss, message", [
    (lambda d: d.mkdir(), "final", "no TensorBoard event files (events.out.tfevents.*)"),
    (lambda d: write_run(d, None, [(3, 512.0)]), "final", "no val/loss scalar in its TensorBoard events"),
    (lambda d: (write_run(d, [(3, 5.0)], [(3, 512.0)]), SummaryWriter(str(d), purge_step=0).close()), "final",
     "no val/loss scalar in its TensorBoard events"),  # the tag is there, its points hidden by a resume's purge
    (lambda d: write_run(d, [(3, 5.0), (7, math.nan)], [(3, 512.0)]), "final",
     "the final val/loss (step 7) is nan: the run diverged"),
    (lambda d: write_run(d, [(3, math.nan), (7, math.inf)], [(3, 512.0)]), "best", "every val/loss is non-finite"),
    (lambda d: write_run(d, [(3, 5.0)], None), "final", "no val/tokens beside it and the run logged no train/tokens"),
    (lambda d: write_run(d, [(3, 5.0)], None, val_tokens=[(2, 512.0)]), "final", "logged no train/tokens scalar"),
    (lambda d: write_run(d, [(3, 5.0)], [(3, 512.0)], config=None), "final", "no hparams.yaml"),
])
def test_a_bad_run_is_refused_with_one_line_naming_it(tmp_path, make, loss, message):
    run = tmp_path / "bad_run"
    make(run)
    with pytest.raises(LLMKitError) as e:
        read_run(run, loss=loss)
    assert str(e.value).startswith(f"run {run}: ") and message in str(e.value) and "\n" not in str(e.value)


def test_best_skips_a_diverged_tail_and_hparams_need_the_model_config(tmp_path):
    run = write_run(tmp_path / "run", [(3, 5.0), (7, 4.0), (9, math.nan)], [(9, 1280.0)])
    assert (read_run(run, loss="best").loss, read_run(run, loss="best").step) == (4.0, 7)
    (run / "hparams.yaml").write_text("optim: {lr: 0.1}\n")
    with pytest.raises(LLMKitError, match="hparams.yaml has no 'config' mapping"):
        read_run(run, loss="best")
    (run / "hparams.yaml").write_text("config: {n_layers: 2, wings: 4}\n")
    with pytest.raises(LLMKitError, match=r"run .*run: hparams.yaml config: unknown model config keys \['wings'\]"):
        read_run(run, loss="best")
    (run / "hparams.yaml").write_text("config: {n_layers: [2\nseq_len: 32\n")  # PyYAML's message spans 8 lines
    with pytest.raises(LLMKitError) as refused:
        read_run(run, loss="best")
    assert str(refused.value) == (f"run {run}: hparams.yaml is not readable YAML (at line 2, column 8: expected ',' or "
                                  "']', but got ':'); restore the file")



def test_a_model_config_without_the_models_sizes_is_refused(tmp_path):
    """`config: {}` built ModelConfig's defaults, a 12-layer, 768-wide model: the FLOPs came out 100
    times those of the model trained, and the fit went ahead."""
    run = write_run(tmp_path / "run", [(3, 5.0)], [(3, 512.0)], hparams_seq_len=32)
    for config, missing in (("{}", "vocab_size, n_layers, d_model, n_heads, d_ff, max_seq_len, n_streams"),
                            ("{vocab_size: 256, n_layers: 2, d_model: 32, n_heads: 4, max_seq_len: 128}",
                             "d_ff, n_streams")):
        (run / "hparams.yaml").write_text(f"config: {config}\nseq_len: 32\n")
        with pytest.raises(LLMKitError) as e:
            read_run(run)
        assert str(e.value) == (
            f"run {run}: hparams.yaml config gives no {missing}: the parameter count and FLOPs need the model's sizes "
            "(PretrainModule saves them all); restore the file or leave the run out"
        )


@pytest.mark.parametrize("cli_seq_len, hparams_seq_len, key, shown", [
    (-4, 32, "config.yaml data.seq_len", "-4"),  # counted in the FLOPs as it was
    (0, 32, "config.yaml data.seq_len", "0"),
    ("abc", 32, "config.yaml data.seq_len", "'abc'"),  # a traceback: ValueError: invalid literal for int()
    (2.5, 32, "config.yaml data.seq_len", "2.5"),  # counted as 2
    (True, 32, "config.yaml data.seq_len", "True"),  # counted as 1
    ("absent", -4, "hparams.yaml seq_len", "-4"),
])
def test_a_window_length_that_is_not_a_positive_integer_is_refused(tmp_path, cli_seq_len, hparams_seq_len, key,
                                                                   shown):
    run = write_run(tmp_path / "run", [(3, 5.0)], [(3, 512.0)], hparams_seq_len=hparams_seq_len,
                    cli_seq_len=cli_seq_len)
    with pytest.raises(LLMKitError) as e:
        read_run(run)
    assert str(e.value) == (f"run {run}: {key} is {shown}; it must be a positive integer (or null for the model's "
                            "max_seq_len): correct it or leave the run out")


@pytest.mark.parametrize("sizes, message", [  # ModelConfig checks the model's numbers; the error names the run
    ({"d_model": -4}, "invalid model config: d_model must be >= 1, got -4"),
    ({"n_layers": "abc"}, "model config key n_layers: expected int, got 'abc'"),
])
def test_a_model_size_that_is_not_a_positive_integer_is_refused(tmp_path, sizes, message):
    run = write_run(tmp_path / "run", [(3, 5.0)], [(3, 512.0)])
    (run / "hparams.yaml").write_text(yaml.safe_dump({"config": {**CONFIG.to_dict(), **sizes}}))
    with pytest.raises(LLMKitError) as e:
        read_run(run)
    assert str(e.value) == f"run {run}: hparams.yaml config: {message}"


CUT_OFF = "its last record is cut off: a run still writing it, or a write or copy cut short"
CORRUPT = "a record fails its checksum: the file is damaged"


@pytest.mark.parametrize("damage, why", [
    (lambda data: data[:60], CUT_OFF),  # its first record whole, the second cut off
    (lambda data: b"not an event file\n", CORRUPT),
    (lambda data: data[:70] + bytes([data[70] ^ 0xFF]) + data[71:], CORRUPT),
], ids=["truncated", "text", "flipped"])
def test_a_damaged_event_file_is_named_not_taken_for_a_run_that_never_validated(tmp_path, damage, why):
    """EventAccumulator stops at a truncated or corrupt record without a word: the run was said to
    have no val/loss, "so it never validated; give it val_files", and the damage went unsaid."""
    run = write_run(tmp_path / "run", [(3, 5.0)], [(3, 512.0)])
    (events,) = run.glob("events.out.tfevents.*")
    events.write_bytes(damage(events.read_bytes()))
    with pytest.raises(LLMKitError) as e:
        read_run(run)
    assert str(e.value) == (f"run {run}: TensorBoard event file {events.name} cannot be read to its end ({why}) and "
                            "no val/loss was read before that; restore the file or leave the run out")

def test_a_run_continued_from_a_checkpoint_is_refused(tmp_path):
    """Its hparams.yaml config is the one given (the default 12-layer model, say), not the checkpoint's shape it
    trained, so its parameters and FLOPs were another model's; and its loss owes to the checkpoint's training."""
    run = write_run(tmp_path / "run", [(3, 5.0)], [(3, 512.0)])
    hparams = yaml.safe_load((run / "hparams.yaml").read_text().split("optim:")[0])
    (run / "hparams.yaml").write_text(yaml.safe_dump({**hparams, "init_ckpt": "base/last.ckpt"}))
    with pytest.raises(LLMKitError) as e:
        read_run(run)
    assert str(e.value) == (f"run {run}: it continued from init_ckpt base/last.ckpt, whose training its val/loss owes "
                            "to and its tokens and FLOPs leave out: it is no point of a scaling law; fit runs trained "
                            "from scratch")
    (run / "hparams.yaml").write_text(yaml.safe_dump({**hparams, "init_ckpt": None}))  # a run from scratch's
    assert read_run(run).step == 3


def test_a_damaged_later_event_file_is_named_in_a_warning(tmp_path):
    """A resumed run has an event file per process: damage in the later one hid its last validations,
    and the run's point silently came from an earlier one."""
    run = write_run(tmp_path / "run", [(3, 5.0)], [(3, 512.0)], val_tokens=[(3, 512.0)])
    (first,) = run.glob("events.out.tfevents.*")
    writer = SummaryWriter(str(run))  # the resumed run's file, named to sort after the first (tests/conftest.py)
    writer.add_scalar("val/loss", 4.0, 9)
    writer.add_scalar("val/tokens", 1536.0, 9)
    writer.flush()
    (later,) = set(run.glob("events.out.tfevents.*")) - {first}
    whole = later.stat().st_size
    writer.add_scalar("val/loss", 3.0, 12)
    writer.close()
    later.write_bytes(later.read_bytes()[:whole + 10])  # the step-12 record cut off
    with pytest.warns(UserWarning) as caught:
        point = read_run(run)
    assert (point.step, point.loss, point.tokens) == (9, 4.0, 1536.0)
    assert [str(w.message) for w in caught] == [
        f"run {run}: TensorBoard event file {later.name} cannot be read to its end ({CUT_OFF}): what it logged after "
        "that is not read, so this run's point comes from the val/loss logged before it; restore the file or leave the "
        "run out"]


def test_one_run_is_too_few_and_the_error_names_it(tmp_path):
    run = write_run(tmp_path / "only", [(3, 5.0)], [(3, 512.0)])
    with pytest.raises(LLMKitError, match=rf"1 run\(s\) \({run}\) give 1 distinct value\(s\) of training FLOPs; "
                                          r"a fit with 1 breakpoint\(s\) needs at least 4"):
        fit_runs(read_runs([run]), "compute", breaks=1)


def test_runs_on_shards_of_different_tokenizers_are_not_fitted_together(tmp_path, monkeypatch):
    """Losses in nats per token of two tokenizers were fitted as one law without a word."""
    for name, sha in (("a", "a" * 64), ("b", "b" * 64)):
        (tmp_path / f"{name}.bin").write_bytes(b"")
        (tmp_path / f"{name}.bin.json").write_text(json.dumps({"tokenizer_sha256": sha}))
    a = write_run(tmp_path / "ra", [(3, 5.0)], [(3, 512.0)], train_files=str(tmp_path / "a.bin"))
    same = write_run(tmp_path / "rs", [(3, 4.0)], [(3, 1024.0)], train_files=str(tmp_path / "a*.bin"))
    gone = write_run(tmp_path / "rg", [(3, 4.5)], [(3, 768.0)], train_files="moved/elsewhere.bin")
    assert [p.tokenizer for p in read_runs([a, same, gone])] == ["a" * 64, "a" * 64, None]  # unknown: not refused
    b = write_run(tmp_path / "rb", [(3, 4.0)], [(3, 1024.0)], train_files=[str(tmp_path / "b.bin")])
    with pytest.raises(LLMKitError, match=rf"runs {a} and {b} trained on shards of different tokenizers \(sha256 "
                                          r"aaaaaaaaaaaa and bbbbbbbbbbbb\)"):
        read_runs([a, b])
    # a path relative to the launch directory, which the run's config.yaml gives: it was read from here, and
    # from another directory the runs were fitted together (a same-named shard here would have been taken)
    elsewhere = tmp_path / "elsewhere"  # the directory fit runs in holds a b.bin of its own, of tokenizer a
    elsewhere.mkdir()
    (elsewhere / "b.bin").write_bytes(b"")
    (elsewhere / "b.bin.json").write_text(json.dumps({"tokenizer_sha256": "a" * 64}))
    monkeypatch.chdir(elsewhere)
    for logger in ({"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "tb"}}, None):
        run = tmp_path / ("runs/tb" if logger else "lightning_logs") / "version_0"
        run.mkdir(parents=True)
        relative = write_run(run, [(3, 4.0)], [(3, 1024.0)], train_files="b.bin")
        (relative / "config.yaml").write_text(yaml.safe_dump({"trainer": {"logger": logger}}))
        with pytest.raises(LLMKitError, match=rf"runs {a} and {relative} trained on shards of different tokenizers"):
            read_runs([a, relative])


def synthetic_runs(root: Path, budgets: list[int], at: float) -> list[Path]:
    """Runs of one model whose final val/loss follows a two-segment power law in compute."""
    flops_per_token = Transformer(CONFIG).flops_per_token(64)
    runs = []
    for tokens in budgets:
        loss = float(broken_power_law(flops_per_token * tokens, 4.0, (-0.02, -0.25), at))
        runs.append(write_run(root / f"t{tokens}" / "version_0", [(1, 9.0), (tokens // 512 - 1, loss)],
                              [(tokens // 512 - 1, float(tokens))], hparams_seq_len=64))
    return runs


def test_scaling_fit_prints_the_runs_and_segments_and_writes_json_and_a_plot(tmp_path, capsys):
    budgets = [2**k * 1024 for k in range(8)]
    at = Transformer(CONFIG).flops_per_token(64) * 20_000
    synthetic_runs(tmp_path / "runs", budgets, at)
    out, png = tmp_path / "fit.json", tmp_path / "fit.png"
    code = main(["scaling", "fit", "--runs", str(tmp_path / "runs"), "--predict", f"{at * 100:g}",
                 "--plot", str(png), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    table = printed.split("\n\n")[0]
    assert table.count("/version_0") == 8 and "segment" in printed and "slope" in printed
    # their hparams name no shards: fitted, and said to be unchecked (the fit said nothing)
    assert "8 of the runs (e.g. " in printed and "are not checked for one tokenizer: their hparams.yaml names no " \
           "shard whose metadata records one, or it cannot be found" in printed
    saved = json.loads(out.read_text())  # TensorBoard keeps float32 losses: 1e-7 relative
    assert saved["fit"]["breaks"] == [pytest.approx(at, rel=1e-4)]
    assert [s["slope"] for s in saved["fit"]["segments"]] == pytest.approx([-0.02, -0.25], abs=1e-5)
    assert [r["tokens"] for r in saved["runs"]] == budgets  # sorted by compute
    expected = 4.0 * 100**-0.25
    assert saved["prediction"]["loss"] == pytest.approx(expected, rel=1e-5)
    assert f"{expected:.4f}" in printed and "-0.2500" in printed
    assert png.read_bytes()[:4] == b"\x89PNG"
    # tokens as the axis: the same law (one model, compute proportional to tokens), breaks given
    assert main(["scaling", "fit", "--runs", str(tmp_path / "runs"), "--x", "tokens", "--positions", "20000",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["fit"]["segments"][1]["slope"] == pytest.approx(-0.25, abs=1e-5)


def test_scaling_fit_errors_are_one_line_naming_the_run(tmp_path, capsys):
    only = write_run(tmp_path / "only", [(3, 5.0)], [(3, 512.0)])
    assert main(["scaling", "fit", "--runs", str(only)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llmkit: error: 1 run(s) (") and str(only) in err and err.count("\n") == 1
    nan = write_run(tmp_path / "nan", [(3, math.nan)], [(3, 512.0)])
    assert main(["scaling", "fit", "--runs", str(only), str(nan)]) == 1
    assert f"run {nan}: the final val/loss (step 3) is nan" in capsys.readouterr().err
    assert main(["scaling", "fit", "--runs", str(only), "--breaks", "2", "--positions", "1e9"]) == 1
    assert "--positions gives 1 breakpoint(s) but --breaks is 2" in capsys.readouterr().err



@pytest.mark.parametrize("value", ["inf", "nan", "0", "-1"])
def test_scaling_fit_refuses_a_prediction_at_no_positive_finite_x(tmp_path, capsys, value):
    """--predict inf printed a predicted val/loss at inf training FLOPs (nan, or 0) and exited 0."""
    run = write_run(tmp_path / "run", [(3, 5.0)], [(3, 512.0)])
    assert main(["scaling", "fit", "--runs", str(run), "--predict", value]) == 1
    assert capsys.readouterr().err == f"llmkit: error: --predict must be positive and finite, got {float(value)}\n"

# ---------------------------------------------------------------- real runs


@pytest.mark.slow
def test_a_lightning_cli_pretraining_run_is_read_as_it_trained(shards, tmp_path):
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 6, "log_every_n_steps": 4,
                    "val_check_interval": 6, "check_val_every_n_epoch": None, "num_sanity_val_steps": 0,
                    "limit_val_batches": 2, "enable_progress_bar": False, "enable_model_summary": False,
                    "callbacks": [{"class_path": "llmkit.callbacks.Checkpoint"}],
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(tmp_path / "logs"), "name": "cli"}}},
        "model": {"config": {**CONFIG.to_dict(), "vocab_size": 384}, "optim": {"lr": 1e-3, "warmup_steps": 1}},
        "data": {"train_files": [str(shards["train"])], "val_files": [str(shards["val"])], "seq_len": 16,
                 "batch_size": 4},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["pretrain", "fit", "--config", str(tmp_path / "config.yaml")]) == 0
    run = tmp_path / "logs" / "cli" / "version_0"
    point = read_run(run)
    assert point.step == 5 and point.tokens == 6 * 4 * 16  # validated after 6 steps; tokens logged at step 3 only
    # a validate of the same weights logs at their step, 6: its tokens are still those of 6 steps, not 7
    assert main(["pretrain", "validate", "--config", str(tmp_path / "config.yaml"),
                 "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]) == 0
    validated = read_run(run)
    assert validated.step == 6 and validated.tokens == 6 * 4 * 16
    assert point.seq_len == 16 and 0 < point.loss < math.log(384) + 0.5
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_dict(config["model"]["config"]))
    assert point.flops == model.flops_per_token(16) * 384


@pytest.mark.slow
def test_a_sweep_feeds_scaling_fit(tmp_path, capsys):
    from bench import sweep

    rows = sweep.main(["--d-models", "16", "32", "--n-layers", "1", "--tokens", "512", "2048", "--n-streams", "2",
                       "--seq-len", "16", "--batch-size", "8", "--max-files", "40", "--vocab-size", "512",
                       "--val-windows", "8", "--work", str(tmp_path)])
    assert [(r["d_model"], r["tokens"]) for r in rows] == [(16, 512), (16, 2048), (32, 512), (32, 2048)]
    assert all(0 < r["val_loss"] < math.log(512) + 0.5 for r in rows)
    assert rows[1]["val_loss"] < rows[0]["val_loss"]  # more tokens, lower loss
    capsys.readouterr()
    out = tmp_path / "fit.json"
    assert main(["scaling", "fit", "--runs", str(tmp_path / "runs"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "segment" in printed and printed.count("version_0") == 4
    saved = json.loads(out.read_text())
    by_run = {r["run"]: r for r in saved["runs"]}
    for row in rows:  # the reader recovers what the sweep trained, from the logs alone
        read = by_run[row["run"]]
        assert (read["params"], read["tokens"], read["loss"]) == (row["params"], row["tokens"],
                                                                  pytest.approx(row["val_loss"], rel=1e-6))
        assert read["flops"] == pytest.approx(row["flops"], rel=1e-12)
    assert len(saved["fit"]["segments"]) == 2 and saved["fit"]["n_points"] == 4
