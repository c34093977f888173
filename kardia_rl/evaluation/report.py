"""Writing evaluation outputs: metrics.json, report.md (the paper's main-table layout) and PNG plots.

Every file is written atomically (utils/io.py), PNGs included (rendered to memory, then an atomic write),
so a crash never leaves a half-written report. matplotlib runs on the Agg backend (no display needed).
"""
from __future__ import annotations

import os
from typing import Optional

from kardia_rl.rewards.judge.base import DIMENSIONS
from kardia_rl.rewards.judge.identity import judge_identity_line
from kardia_rl.utils.io import atomic_write_text, write_json
from kardia_rl.utils.plots import pyplot, save_figure

DIM_TITLES = {"relevance": "Relevance", "fluency": "Fluency", "empathy": "Empathy",
              "persona_consistency": "Persona", "safety": "Safety"}
PROXY_NOTE = ("Judge: the offline embedding proxy (MiniLM similarities mapped onto the rubric scale), NOT an "
              "LLM judge: use it for smoke tests and relative comparisons only, never for reported results.")


def fmt(x: Optional[float], spec: str = ".2f", scale: float = 1.0) -> str:
    return "–" if x is None else format(x * scale, spec)


# --------------------------------------------------------------------------------------------- eval
def main_table(doc: dict) -> str:
    """Rows = models, columns as in the paper's main table (plus Format, Reward, Distinct-2, Len)."""
    head = ["Model", "Emotion Acc", *[DIM_TITLES[d] for d in DIMENSIONS], "Format", "Judged", "Reward", "Distinct-2",
            "Len"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for name, entry in doc["models"].items():
        m = entry["metrics"]
        cells = [name, fmt(m["emotion_accuracy"], ".1f", 100)]
        cells += [fmt(m["dims"][d]["mean"]) for d in DIMENSIONS]
        cells += [fmt(m["format_valid_rate"], ".1f", 100), fmt(m["judged_rate"], ".1f", 100),
                  fmt(m["reward_mean"], ".3f"), fmt(m["distinct_2"], ".3f"), fmt(m["response_len_mean"], ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail_table(doc: dict) -> str:
    head = ["Model", "n", *[f"{DIM_TITLES[d]} (0-1)" for d in DIMENSIONS], "Judged", "Judge failures", "Fallbacks",
            "Distinct-1", "Truncated", "tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for name, entry in doc["models"].items():
        m = entry["metrics"]
        cells = [name, str(m["n"]), *[fmt(m["dims"][d]["normalized"], ".3f") for d in DIMENSIONS], str(m["judged"]),
                 str(m["judge_failures"]), str(m["fallbacks"]), fmt(m["distinct_1"], ".3f"),
                 fmt(m["truncated_rate"], ".1f", 100) + "%", fmt(entry.get("tokens_per_s"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def emotion_table(doc: dict) -> str:
    names = list(doc["models"])
    emotions = sorted({e for entry in doc["models"].values() for e in entry["metrics"]["per_emotion"]})
    lines = ["| Gold emotion | n | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for e in emotions:
        per = [doc["models"][n]["metrics"]["per_emotion"].get(e) for n in names]
        count = next(p["n"] for p in per if p)
        lines.append(f"| {e} | {count} | " + " | ".join(fmt(p and p["accuracy"], ".1f", 100) for p in per) + " |")
    return "\n".join(lines)


def rubric_counting(doc: dict) -> str:
    """How the rubric columns count malformed answers (rewards.answer_metrics.recompute_metrics applies the rule)."""
    if doc.get("judge_malformed"):
        how = "malformed answers were judged too (judge.judge_malformed=true: their response text)"
    else:
        how = ("malformed answers were not judged and count at the scale floor 1 (judge.judge_malformed=false; "
               "set it to true to judge their text, e.g. for base models without span tokens)")
    return f"means over all answers; {how}; a failed judgment also counts at the floor."


def models_line(doc: dict) -> str:
    """Which checkpoint each row scored; a GRPO best_policy says the step and validation reward it was kept for."""
    out = []
    for name, e in doc["models"].items():
        sel = e.get("selection")
        what = (f" (best_policy: GRPO step {sel['step']} of {sel['num_steps']}, best val/reward_mean "
                f"{sel['val_reward_mean']:.3f} on {sel['val_samples']} validation prompts)") if sel else ""
        out.append(f"{name} = `{e.get('model_path')}`{what}")
    return "; ".join(out)


def render_eval_markdown(doc: dict) -> str:
    dec = doc["decoding"]
    decoding = "greedy" if dec["greedy"] else f"sampling (temperature {dec['temperature']}, top-p {dec['top_p']})"
    judge_line = judge_identity_line(doc["judge_identity"]) if doc.get("judge_identity") else f"Judge: `{doc['judge']}`"
    parts = [
        "# Evaluation report", "",
        f"- Data: `{doc['data_source']}` ({doc['n_samples']} of {doc['n_available']} samples)",
        f"- Decoding: {decoding}, one answer per sample, at most {dec['max_new_tokens']} new tokens, seed {dec['seed']}",
        f"- {judge_line}; unified reward weights {doc['reward_weights']}",
        f"- Models: {models_line(doc)}",
    ]
    if doc.get("judge_is_proxy"):
        parts.append(f"- **{PROXY_NOTE}**")
    parts.append(f"- Rubric columns: {rubric_counting(doc)}")
    unjudged = {n: e["metrics"]["n"] - e["metrics"]["judged"] for n, e in doc["models"].items()}
    if any(unjudged.values()):
        parts.append("- Not judged (rubric reward 0; in the rubric columns as said above): "
                     + ", ".join(f"{n}: {k}" for n, k in unjudged.items()))
    parts += ["", "## Main table", "",
              "Emotion Acc, Format and Judged in %; the five rubric dimensions are judge means on the 1-5 scale "
              "over ALL answers (see 'Rubric columns' above), so every model is scored on the same samples; "
              "Emotion Acc counts only well-formed answers whose emotion span matches the gold label; Judged = "
              "answers the judge scored; Reward = mean unified reward; Len = mean words of the response.", "",
              main_table(doc), "", "## Details", "", detail_table(doc), "",
              "## Emotion accuracy by gold emotion (%)", "", emotion_table(doc), "",
              "## Plots", "", "![rubric dimensions](dimensions.png)", "", "![emotion accuracy](emotion_accuracy.png)",
              "", "Per-sample answers, spans, scores and rationales: "
              + ", ".join(f"`{e['samples_file']}`" for e in doc["models"].values()), ""]
    return "\n".join(parts)


def plot_dimensions(doc: dict, path: str) -> None:
    """Grouped bars: the five dimension means (1-5) per model."""
    plt = pyplot()
    names = list(doc["models"])
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(8, 4))
    for k, name in enumerate(names):
        dims = doc["models"][name]["metrics"]["dims"]
        xs = [i + k * width for i in range(len(DIMENSIONS))]
        ax.bar(xs, [dims[d]["mean"] or 0.0 for d in DIMENSIONS], width, label=name)
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(DIMENSIONS))])
    ax.set_xticklabels([DIM_TITLES[d] for d in DIMENSIONS])
    ax.set_ylim(0, 5)
    ax.set_ylabel(f"judge score (1-5), judge={doc['judge']}")
    ax.set_title("Rubric dimensions")
    ax.legend()
    save_figure(fig, path)


def plot_emotion_accuracy(doc: dict, path: str) -> None:
    """Horizontal grouped bars: accuracy per gold emotion per model."""
    plt = pyplot()
    names = list(doc["models"])
    emotions = sorted({e for entry in doc["models"].values() for e in entry["metrics"]["per_emotion"]})
    height = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(7, max(3, 0.32 * len(emotions) * max(1, len(names)) ** 0.5 + 1)))
    for k, name in enumerate(names):
        per = doc["models"][name]["metrics"]["per_emotion"]
        ys = [i + k * height for i in range(len(emotions))]
        ax.barh(ys, [100 * per[e]["accuracy"] if e in per else 0.0 for e in emotions], height, label=name)
    ax.set_yticks([i + height * (len(names) - 1) / 2 for i in range(len(emotions))])
    ax.set_yticklabels([f"{e} (n={next(d['metrics']['per_emotion'][e]['n'] for d in doc['models'].values() if e in d['metrics']['per_emotion'])})"
                        for e in emotions])
    ax.set_xlim(0, 100)
    ax.set_xlabel("emotion accuracy (%)")
    ax.set_title("Emotion accuracy by gold emotion")
    ax.legend()
    save_figure(fig, path)


def write_eval_outputs(out_dir: str, doc: dict) -> dict:
    """metrics.json, report.md, dimensions.png, emotion_accuracy.png in out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f) for k, f in (("metrics", "metrics.json"), ("report", "report.md"),
                                                       ("dimensions", "dimensions.png"),
                                                       ("emotion_accuracy", "emotion_accuracy.png"))}
    write_json(paths["metrics"], doc)
    atomic_write_text(paths["report"], render_eval_markdown(doc))
    plot_dimensions(doc, paths["dimensions"])
    plot_emotion_accuracy(doc, paths["emotion_accuracy"])
    return paths


# ---------------------------------------------------------------------------------------- agreement
def render_agreement_markdown(rep: dict) -> str:
    lines = ["# Judge agreement", "",
             f"- Data: `{rep['data']}`, responses: `{rep['responses']}` ({rep['n_responses']} answers)",
             "- Spearman rho on the raw scores; Cohen's kappa with quadratic weights on the 1-5 scale (scores "
             "rounded half up to integers); n = answers both judges scored. '–' = undefined (no variance).", "",
             "## Judges", "", "| Judge | Backend | Seed | Judged | Failures | Fallbacks | "
             + " | ".join(f"{DIM_TITLES[d]} mean" for d in DIMENSIONS) + " |",
             "|---|---|---:|---:|---:|---:|" + "---:|" * len(DIMENSIONS)]
    for name, j in rep["judges"].items():
        lines.append(f"| {name} | {j['backend']} | {j['seed']} | {j['judged']} | {j['failures']} | {j['fallbacks']} | "
                     + " | ".join(fmt(j["dims_mean"][d]) for d in DIMENSIONS) + " |")
    lines += ["", "## Agreement per pair and dimension", "",
              "| Judge A | Judge B | Dimension | n | Spearman | p | Kappa (quadratic) | Exact | Mean abs diff |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for p in rep["pairs"]:
        for d in DIMENSIONS:
            s = p["dims"][d]
            lines.append(f"| {p['a']} | {p['b']} | {DIM_TITLES[d]} | {s['n']} | {fmt(s['spearman'], '.3f')} | "
                         f"{fmt(s['spearman_p'], '.3g')} | {fmt(s['kappa'], '.3f')} | {fmt(s['exact_agreement'], '.3f')} | "
                         f"{fmt(s['mean_abs_diff'], '.3f')} |")
        lines.append(f"| {p['a']} | {p['b']} | **mean over dimensions** | | {fmt(p['spearman_mean'], '.3f')} | | "
                     f"{fmt(p['kappa_mean'], '.3f')} | | |")
    return "\n".join(lines) + "\n"
