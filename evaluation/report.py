"""Writing the evaluation's output: metrics.json, predictions.jsonl, report.md and report.html.

The two reports render the same view from Jinja templates (evaluation/templates/); report.html
adds the plots (accuracy per model with 95% error bars, the training loss curve) as inline base64
PNGs drawn with matplotlib's Agg backend, so the file is self-contained. Each file is written
atomically: a reader sees the previous report or the new one, never half of one.
"""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

from medtune.fileio import atomic_write

FILES = {"metrics": "metrics.json", "predictions": "predictions.jsonl", "markdown": "report.md", "html": "report.html"}


def write_all(result: dict, rows: list[dict], out: Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {key: out / name for key, name in FILES.items()}
    with atomic_write(paths["predictions"]) as fh:
        for row in rows:
            fh.write(json.dumps(_finite(row), default=_json_default, allow_nan=False) + "\n")
    result = {**result, "files": {k: str(v) for k, v in paths.items()}}
    with atomic_write(paths["metrics"]) as fh:
        fh.write(json.dumps(_finite(result), indent=2, default=_json_default, allow_nan=False) + "\n")
    view = build_view(result)
    env = _env()
    with atomic_write(paths["markdown"]) as fh:
        fh.write(env.get_template("report.md.j2").render(**view))
    plots = {"accuracy": accuracy_plot(result), "loss": loss_plot(result.get("training"))}
    with atomic_write(paths["html"]) as fh:
        fh.write(env.get_template("report.html.j2").render(plots=plots, **view))
    return paths


def _finite(value):
    """Strict JSON: -inf (a decision below the top-k cut-off) and NaN become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _env():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(__file__).resolve().parent / "templates")),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined,
    )
    env.filters.update(pct=pct, ci=ci, signed=signed, num=num)
    return env


# --- formatting -------------------------------------------------------------------------------

def pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def ci(bounds) -> str:
    if not bounds:
        return "n/a"
    return f"{100 * bounds[0]:.1f} to {100 * bounds[1]:.1f}"


def signed(value) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f} pts"


def num(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


MODE_TITLES = {
    "likelihood": "Likelihood (the most probable of yes / no / maybe)",
    "generate": "Generation (the decision parsed from a greedy answer)",
}


def build_view(result: dict) -> dict:
    """Everything the templates show, with the numbers already chosen (no logic in templates)."""
    modes = []
    for mode, block in result["results"].items():
        models = []
        for name, r in block["models"].items():
            conf = r["confusion"]
            models.append({
                "name": name, "r": r,
                "missing_label": "unscored" if mode == "likelihood" else "unparseable",
                "missing": r.get("unscored", r.get("unparseable", 0)),
                "confusion_rows": list(zip(conf["labels"], conf["matrix"])), "columns": conf["columns"],
            })
        modes.append({"mode": mode, "title": MODE_TITLES[mode], "method": result["method"][mode],
                      "models": models, "comparisons": block["comparisons"], "bootstrap": block["bootstrap"]})
    rouge = {}
    for sample in result.get("samples") or []:
        for name, ans in sample["answers"].items():
            rouge.setdefault(name, []).append(ans["rouge_l"])
    rouge_means = {name: sum(v) / len(v) for name, v in rouge.items() if v}
    return {"result": result, "modes": modes, "rouge_means": rouge_means, "data": result["data"],
            "training": result.get("training"), "votes": result.get("votes"), "timing": result["timing"],
            "model_infos": result["models"]}


# --- plots --------------------------------------------------------------------------------------

def _figure_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def accuracy_plot(result: dict) -> str | None:
    """Accuracy and macro-F1 per model and mode, with the bootstrap 95% intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = result["results"]
    if not blocks:
        return None
    models = list(next(iter(blocks.values()))["models"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    width = 0.8 / max(len(models), 1)
    for ax, metric, title in ((axes[0], "accuracy", "Accuracy"), (axes[1], "macro_f1", "Macro-F1")):
        for k, name in enumerate(models):
            xs, ys, lo, hi = [], [], [], []
            for j, block in enumerate(blocks.values()):
                r = block["models"][name]
                value, bounds = r[metric] or 0.0, r.get(f"{metric}_ci") or [r[metric] or 0.0] * 2
                xs.append(j + (k - (len(models) - 1) / 2) * width)
                ys.append(value)
                lo.append(max(value - bounds[0], 0.0))
                hi.append(max(bounds[1] - value, 0.0))
            ax.bar(xs, ys, width * 0.92, yerr=[lo, hi], capsize=4, label=name)
            for x, y in zip(xs, ys):  # the value at the foot of the bar, clear of the error bar
                ax.text(x, 0.02, f"{100 * y:.1f}", ha="center", va="bottom", fontsize=8, color="white",
                        fontweight="bold")
        ax.set_xticks(range(len(blocks)), list(blocks))
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{title} (95% bootstrap CI)")
        ax.grid(axis="y", alpha=0.3)
    # Chance for three classes, and always answering the majority decision: the floor to beat.
    dec = result["data"]["decisions"]
    total = sum(dec.values()) or 1
    axes[0].axhline(max(dec.values()) / total, color="grey", ls="--", lw=1, label="always the majority decision")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=len(labels), bbox_to_anchor=(0.5, -0.08))
    return _figure_png(fig)


def loss_plot(training: dict | None) -> str | None:
    """Training loss per step and eval loss per evaluation, from the run's metrics.jsonl."""
    if not training or not training.get("loss_curve"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = zip(*training["loss_curve"])
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(steps, losses, lw=1.2, label="train loss")
    evals = [e for e in training.get("evals") or [] if e.get("step") is not None]
    if evals:
        ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="eval loss")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Training loss")
    return _figure_png(fig)
