"""Fit a scaling law with breakpoints to the validation losses of pretraining runs.

``llmkit scaling fit --runs DIR...``: the work is done by :mod:`llmkit.eval.scaling`; this
function names the flags and prints the table. torch, TensorBoard and matplotlib are imported
when the command runs, so ``llmkit scaling fit --help`` answers at once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from llmkit.errors import LLMKitError
from llmkit.io import write_json_atomic


def fit(
    runs: list[Path],
    x: Literal["compute", "params", "tokens"] = "compute",
    breaks: int | None = None,
    positions: list[float] | None = None,
    loss: Literal["final", "best"] = "final",
    predict: float | None = None,
    plot: Path | None = None,
    out: Path | None = None,
) -> int:
    """Fit a piecewise power law (in log-log space) to the runs' validation losses.

    Args:
        runs: TensorBoard log directories of pretraining runs (lightning_logs/NAME/version_N), or directories
            above them (every run below is used).
        x: what the loss scales with: compute (training FLOPs), params (non-embedding parameters) or tokens.
        breaks: breakpoints to search for (default: 1, or the number of --positions).
        positions: put the breakpoints at these values of --x instead of searching.
        loss: each run's final val/loss, or its best (lowest).
        predict: also print the predicted loss at this value of --x.
        plot: write a PNG of the runs, the fit and its breakpoints here (needs matplotlib).
        out: write the runs, the fit and the prediction as JSON here.
    """
    from llmkit.eval.scaling import AXIS_LABELS, fit_runs, read_runs
    from llmkit.eval.scaling import plot as plot_law

    if breaks is None:
        breaks = 1 if positions is None else len(positions)
    elif positions is not None and len(positions) != breaks:
        raise LLMKitError(f"--positions gives {len(positions)} breakpoint(s) but --breaks is {breaks}: make them agree")
    if predict is not None and not 0 < predict < math.inf:  # NaN too
        raise LLMKitError(f"--predict must be positive and finite, got {predict}")
    points = sorted(read_runs(runs, loss), key=lambda p: (p.x(x), str(p.run)))
    law = fit_runs(points, x, breaks, positions)
    unit = AXIS_LABELS[x]

    width = max(len("run"), *(len(str(p.run)) for p in points))
    print(f"{'run':<{width}}  {x:>13}  {loss + ' val/loss':>15}")
    for p in points:
        value = f"{p.x(x):.4g}" if x == "compute" else f"{p.x(x):,.0f}"
        print(f"{str(p.run):<{width}}  {value:>13}  {p.loss:>15.4f}")
    print(f"\n{'segment':<8} {'from':>10} {'to':>10} {'slope':>9} {'intercept':>10}")
    for i, s in enumerate(law.segments(), start=1):
        print(f"{i:<8} {s.start:>10.4g} {s.end:>10.4g} {s.slope:>9.4f} {s.intercept:>10.4f}")
    where = ", ".join(f"{b:.4g}" for b in law.breaks) or "none"
    if unchecked := [p.run for p in points if p.tokenizer is None]:
        print(f"\n{len(unchecked)} of the runs (e.g. {unchecked[0]}) are not checked for one tokenizer: their "
              f"hparams.yaml names no shard whose metadata records one, or it cannot be found")
    print(f"\n{len(points)} runs, x = {unit}, breakpoints at {where}; loss = 10^intercept * x^slope per segment, "
          f"rms residual {law.rmse:.4f} (log10 loss)")
    prediction = None
    if predict is not None:
        prediction = {"x": predict, "loss": law.predict(predict)}
        print(f"predicted {loss} val/loss at {predict:.4g} {unit}: {prediction['loss']:.4f}")
    if plot is not None:
        plot_law(law, [(p.x(x), p.loss) for p in points], plot, f"{unit} ({x})")
        print(f"wrote {plot}")
    if out is not None:
        write_json_atomic(out, {"x": x, "loss": loss, "runs": [p.to_dict() for p in points], "fit": law.to_dict(),
                                "prediction": prediction})
        print(f"wrote {out}")
    return 0
