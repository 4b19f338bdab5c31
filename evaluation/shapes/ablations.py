"""The paper's guidelines reproduced in miniature on the shapes world (``benchmark --ablations GROUPS``).

Each group compares the benchmark's own students — trained with the release's defaults, the baselines —
with variants that change one option, every run through the real trainer CLI with the same seed, data,
steps and learning rate, sampled with the same CLI, prompts, seeds and guidance at the students' NFEs,
and scored by the same scorer.  The baselines *are* the main benchmark's ``sCM`` and ``MeanFlow`` runs
(reused, never trained twice).  What each group tests, and the paper's claim behind it, is in
``docs/toy_benchmark/ablations.md``.

For every variant row: overall score with its 95 % bootstrap interval over prompts, the score relative to
the teacher at the reference NFE, and Δ = overall(variant) − overall(baseline) with a 95 % *paired*
bootstrap interval over prompts (both models drew the same prompts and seeds; :func:`stats.paired_difference`).
A verdict says "better" or "worse" only when that interval excludes 0, else "not separated at 95 %".
Groups with ``curves`` also plot the training curves (loss, gradient norm before clipping) of baseline and
variants, read from each run's ``logs/metrics.jsonl`` by :mod:`training.plot_metrics`.

Files: ``OUT/ablations/summary.md`` (every table and verdict), ``OUT/ablations/ablations.json``,
``OUT/ablations/<group>/{table.md, plot.png[, curves.png]}``; runs in ``OUT/ablations/runs/<variant>/``,
samples in ``OUT/ablations/samples/<variant>_nfe<N>/``.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from evaluation.shapes.benchmark import (SAMPLERS, SWITCH, BenchmarkError, Flags, Stages, _write_text,
                                         apply_overrides, find_row, relative_interval, relative_score, sample_and_score,
                                         student_flags, train_student)
from evaluation.shapes.stats import paired_difference, read_prompt_scores

#: Rank of the LoRA students of the ``lora`` group (alpha = rank; target modules: training/lora.py's default).
LORA_RANK = 16
#: The ``ema`` group's power-function EMA exponent γ (EDM2's γ = 6.94, σ_rel ≈ 0.10: the average spans about
#: the last tenth of training); fixed before measuring, not tuned on the report prompts.
EMA_POWER = 6.94


@dataclass(frozen=True)
class Variant:
    """One departure from a baseline student: ``overrides`` replace the benchmark's trainer flags
    (None removes a flag)."""

    key: str  # folder and stage id
    method: str  # "sCM" or "MeanFlow": whose baseline it is compared with
    label: str
    overrides: Flags
    #: Extra flags of the sampling CLI (e.g. ``--use_ema`` to sample the EMA export).
    sample_flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Group:
    name: str
    title: str
    #: What the comparison tests (the claim or the reason the option exists).
    claim: str
    #: The baseline's setting of the option, in words.
    baseline: str
    variants: tuple[Variant, ...]
    #: Also plot the training curves (loss, gradient norm) of baseline and variants.
    curves: bool = False
    methods: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", tuple(dict.fromkeys(v.method for v in self.variants)))


GROUPS: dict[str, Group] = {g.name: g for g in (
    Group("timestep_scale", "sCM from the ×1000 teacher vs from the rescaled ×1 teacher",
          "Without moving FLUX's time input from [0, 1000] to [0, 1], sCM's gradient norm keeps rising until "
          "training collapses (paper §4.2.1, after sCM and SANA-Sprint).",
          "from the rescaled ×1 teacher (`--rescaled_checkpoint_path`, `--timestep_scale 1`)",
          (Variant("sCM_x1000", "sCM", "×1000 teacher, no rescaling (`--timestep_scale 1000`)",
                   {"--rescaled_checkpoint_path": None, "--timestep_scale": 1000}),), curves=True),
    Group("kappa", "Plain vs CFG MeanFlow (κ)",
          "Improved CFG (κ > 0: the target mixes the student's own conditional velocity in) raises MeanFlow's "
          "GenEval from 48.65 to 51.41 (paper §4.2.2).",
          "CFG MeanFlow ω = 1, κ = 0.5 (the release README's example)",
          (Variant("MeanFlow_kappa0", "MeanFlow", "κ = 0 (`--cfg_kappa 0`: target ω·v_T, no student term)",
                   {"--cfg_kappa": 0.0}),)),
    Group("adaptive_p", "MeanFlow loss power (`--adaptive_p`)",
          "The higher-order loss ‖Δ‖^(2γ) with γ = 2 beats the usual one: GenEval 44.04 → 48.65 (paper §4.2.2). "
          "With the weight 1/(‖Δ‖² + c)^p, γ = 1 − p: the release's p = 1 is γ = 0; γ = 2 is p = −1.",
          "p = 1 (the release's default, γ = 0)",
          (Variant("MeanFlow_p-1", "MeanFlow", "p = −1 (γ = 2, the paper's higher-order loss)", {"--adaptive_p": -1.0}),
           Variant("MeanFlow_p0.5", "MeanFlow", "p = 0.5 (γ = 0.5, MeanFlow's other recommended value)",
                   {"--adaptive_p": 0.5}))),
    Group("cfg_velocity_interval", "CFG MeanFlow's u_c, u_∅ at h = t − r vs h = 0",
          "The MeanFlow paper evaluates the student's guided terms at h = 0 (instantaneous velocity), whose fixed "
          "point is exactly CFG with scale ω/(1 − κ); the release evaluates them at the row's interval.",
          "h = t − r (`interval`, the release)",
          (Variant("MeanFlow_hzero", "MeanFlow", "h = 0 (`--cfg_velocity_interval zero`)",
                   {"--cfg_velocity_interval": "zero"}),)),
    Group("jvp_velocity", "MeanFlow JVP tangent outside the CFG rows",
          "The release's JVP tangent there is the noisy ε − x₀ while its target uses v_T; the teacher velocity "
          "makes tangent and target consistent.",
          "ε − x₀ (`data`, the release)",
          (Variant("MeanFlow_jvp_teacher", "MeanFlow", "v_T (`--jvp_velocity teacher`)",
                   {"--jvp_velocity": "teacher"}),)),
    Group("logvar_input", "sCM logvar head input",
          "The release's logvar head reads time_text_embed at the TrigFlow angle t ∈ [0, π/2] through the ×1 "
          "sinusoid; FLUX's own conditioning at the flow time stays inside the embedder's trained range.",
          "time_text_embed(t) at the TrigFlow angle (`trig_time`, the release)",
          (Variant("sCM_logvar_flow_time", "sCM", "FLUX's conditioning at the flow time (`--logvar_input flow_time`)",
                   {"--logvar_input": "flow_time"}),)),
    Group("max_grad_norm", "Gradient clipping (sCM)",
          "The release's runs clipped at 1.0 (its scripts' 0.1 was ignored by DeepSpeed); does the clip matter?",
          "clip at 1.0 (the release's effective value)",
          (Variant("sCM_clip_off", "sCM", "no clipping (`--max_grad_norm inf`)", {"--max_grad_norm": "inf"}),
           Variant("sCM_clip0.1", "sCM", "clip at 0.1 (`--max_grad_norm 0.1`, the release scripts' value)",
                   {"--max_grad_norm": 0.1})), curves=True),
    Group("dual_time_init", "MeanFlow interval-embedder initialisation",
          "The paper clones the timestep branch (same weights) for t − r; zeroing its last layer instead makes the "
          "student start exactly at the teacher.",
          "copy of the teacher's timestep embedder (`copy`, the release)",
          (Variant("MeanFlow_dual_zero", "MeanFlow", "last layer zeroed (`--dual_time_init zero`)",
                   {"--dual_time_init": "zero"}),)),
    Group("lora", "LoRA students vs full students, same steps",
          "A LoRA student (teacher = the same base with adapters off, one copy of the weights) keeps the full "
          "student's quality at a fraction of the memory (issue #15).",
          "full student (every weight trained, the release)",
          (Variant(f"sCM_lora{LORA_RANK}", "sCM", f"LoRA rank {LORA_RANK} (`--lora_rank {LORA_RANK}`)",
                   {"--lora_rank": LORA_RANK}),
           Variant(f"MeanFlow_lora{LORA_RANK}", "MeanFlow", f"LoRA rank {LORA_RANK} (`--lora_rank {LORA_RANK}`)",
                   {"--lora_rank": LORA_RANK}))),
    Group("ema", "EMA of the student's weights vs the last weights",
          "Sampling an exponential moving average of the student's weights, as diffusion and consistency models "
          "usually are (EDM2's power-function EMA), beats sampling its last weights; the release keeps no EMA.",
          "the last weights (no EMA, the release)",
          tuple(Variant(f"{method}_ema", method, f"power EMA γ = {EMA_POWER} (`--use_ema --ema_power {EMA_POWER}`, "
                        "sampled with `--use_ema`)", {"--use_ema": SWITCH, "--ema_power": EMA_POWER}, ("--use_ema",))
                for method in ("sCM", "MeanFlow"))),
)}


def parse_groups(value: str) -> tuple[str, ...]:
    """``all`` or comma-separated group names → the group names, in GROUPS order (argparse type)."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    if names == ["all"]:
        return tuple(GROUPS)
    unknown = [n for n in names if n not in GROUPS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown ablation group(s) {', '.join(unknown) or repr(value)}; choose "
                                         f"'all' or from {', '.join(GROUPS)}")
    return tuple(n for n in GROUPS if n in names)


# --------------------------------------------------------------------------------------------
# Running


def run_variant(stages: Stages, variant: Variant, nfes: Sequence[int]) -> dict:
    """Train ``variant`` (its own run folder and stage) and sample it at ``nfes``; a failed training (e.g. a
    collapse that stops the run on non-finite steps) is recorded, not raised, so the other variants run."""
    root = stages.out / "ablations"
    record = _record(stages, variant)
    try:
        export = train_student(stages, variant.method, f"ablation_{variant.key}", Path(record["run_dir"]),
                               variant.overrides)
    except BenchmarkError as exc:
        record["error"] = str(exc)
        return record
    record["rows"] = [sample_and_score(stages, variant.key, nfe, [SAMPLERS[variant.method], "--resume_path", export,
                                                                     *variant.sample_flags],
                                       root / "samples" / f"{variant.key}_nfe{nfe}") for nfe in nfes]
    return record


def _record(stages: Stages, variant: Variant) -> dict:
    """The result entry of a variant before it has run."""
    return {"key": variant.key, "method": variant.method, "label": variant.label,
            "overrides": {k: (None if v is None else str(v)) for k, v in variant.overrides.items()},
            "run_dir": str(stages.out / "ablations" / "runs" / variant.key), "rows": [], "error": None,
            "skipped": None}


def compare(variant_rows: Sequence[dict], baseline_rows: Sequence[dict], reference: Optional[dict]) -> list[dict]:
    """Add ``relative_to_teacher`` and the paired Δ vs the baseline row at the same NFE to each variant row."""
    out = []
    for row in variant_rows:
        base = next((b for b in baseline_rows if b["nfe"] == row["nfe"]), None)
        delta = None
        if base is not None:
            delta = paired_difference(read_prompt_scores(row["samples_dir"]), read_prompt_scores(base["samples_dir"]))
        out.append({**row, "relative_to_teacher": relative_score(row, reference), "delta": delta})
    return out


def _slim(row: dict, reference: Optional[dict]) -> dict:
    keep = ("model", "nfe", "overall", "overall_interval", "tasks", "total_images", "samples_dir", "delta")
    return {**{k: row[k] for k in keep if k in row}, "relative_to_teacher": relative_score(row, reference),
            "relative_interval": _relative_interval(row, reference)}


def _relative_interval(row: dict, reference: Optional[dict]) -> Optional[list[float]]:
    if row is reference:
        return None
    return row["relative_interval"] if row.get("relative_interval") is not None else relative_interval(row, reference)


def run_group(stages: Stages, group: Group, rows: Sequence[dict]) -> dict:
    """Every variant of ``group`` against the benchmark's baseline rows (``rows``: the main benchmark's)."""
    config = stages.config
    reference = find_row(rows, "teacher", config.reference_nfe)
    result = {"name": group.name, "title": group.title, "claim": group.claim, "baseline": group.baseline,
              "reference": _slim(reference, reference) if reference else None, "arms": []}
    for method in group.methods:
        baseline_rows = [r for r in rows if r["model"] == method]
        arm = {"method": method, "baseline_rows": [_slim(r, reference) for r in baseline_rows],
               "baseline_run_dir": str(stages.out / method), "variants": []}
        for variant in (v for v in group.variants if v.method == method):
            if _same_flags(stages, variant):  # e.g. the benchmark's defaults were changed to this variant's
                arm["variants"].append({**_record(stages, variant), "skipped": f"the benchmark's {method} student "
                                        "already uses these flags, so it is its own baseline"})
                continue
            record = run_variant(stages, variant, config.student_nfes)
            record["rows"] = [_slim(r, reference) for r in compare(record["rows"], baseline_rows, reference)]
            arm["variants"].append(record)
        result["arms"].append(arm)
    result["verdicts"] = verdict_lines(result)
    if group.curves:
        result["curves"] = curve_summary(result)
    return result


def _same_flags(stages: Stages, variant: Variant) -> bool:
    base = student_flags(stages, variant.method, stages.out / variant.method)
    changed = apply_overrides(base, variant.overrides)
    return {k: str(v) for k, v in changed.items()} == {k: str(v) for k, v in base.items()}


def run_ablations(stages: Stages, groups: Sequence[str], rows: Sequence[dict], chance: Optional[dict] = None) -> dict:
    """Run the named groups after the main benchmark and write ``OUT/ablations/``; returns their results."""
    results = {"groups": [run_group(stages, GROUPS[name], rows) for name in groups],
               "level": 0.95, "chance": (chance or {}).get("floor", {}).get("overall")}
    write_ablation_report(stages.out / "ablations", results)
    return results


# --------------------------------------------------------------------------------------------
# Verdicts and curves


def verdict_lines(group: dict) -> list[str]:
    """One line per variant: its verdict at each NFE (better / worse / not separated at 95 %)."""
    lines = []
    for arm in group["arms"]:
        for variant in arm["variants"]:
            head = f"{arm['method']}, {variant['label']} vs {group['baseline']}"
            if variant["error"] or variant.get("skipped"):
                why = variant.get("skipped") or f"the variant's training failed ({_first_line(variant['error'])})"
                lines.append(f"{head}: not measured: {why}")
                continue
            parts: dict[str, list[str]] = {}
            for row in variant["rows"]:
                word = row["delta"]["verdict"] if row["delta"] else "no baseline row"
                parts.setdefault(word, []).append(str(row["nfe"]))
            said = "; ".join(f"{'variant ' + w if w in ('better', 'worse') else w} at NFE {', '.join(n)}"
                             for w, n in parts.items())
            lines.append(f"{head}: {said} (95 % paired bootstrap over prompts)")
    return lines


def _first_line(text: str) -> str:
    return text.splitlines()[0][:300] if text else ""


def curve_summary(group: dict) -> dict:
    """Per run: gradient norm (before clipping) at the start, at the end, its maximum and growth, the last
    loss and the skipped non-finite steps, from ``logs/metrics.jsonl``."""
    from training.plot_metrics import metrics_file, read_records

    out = {}
    for label, run_dir in curve_runs(group).items():
        try:
            records = read_records(metrics_file(run_dir))
        except FileNotFoundError:
            continue
        norms = [float(r["grad_norm"]) for r in records if isinstance(r.get("grad_norm"), (int, float))]
        loss_key = next((k for k in (records[0] if records else {}) if k.startswith("loss")), None)
        tenth = max(1, len(norms) // 10)
        first, last = _finite_mean(norms[:tenth]), _finite_mean(norms[-tenth:])
        out[label] = {"steps": len(records), "grad_norm_first_tenth": first, "grad_norm_last_tenth": last,
                      "grad_norm_max": max((n for n in norms if math.isfinite(n)), default=None),
                      "grad_norm_growth": last / first if first and last is not None else None,
                      "loss_key": loss_key, "loss_last": float(records[-1][loss_key]) if loss_key else None,
                      "skipped_nonfinite": int(records[-1].get("skipped_nonfinite", 0)) if records else 0}
    return out


def _finite_mean(values: Sequence[float]) -> Optional[float]:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def curve_runs(group: dict) -> dict[str, str]:
    """{label: run folder} of the baselines and variants of a group (labels as in its table)."""
    runs = {}
    for arm in group["arms"]:
        runs[f"{arm['method']} baseline"] = arm["baseline_run_dir"]
        for variant in arm["variants"]:
            if not variant.get("skipped"):
                runs[f"{arm['method']} {variant['label']}"] = variant["run_dir"]
    return runs


# --------------------------------------------------------------------------------------------
# Report


def _pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _score_cell(row: dict, chance: Optional[float]) -> str:
    interval = row.get("overall_interval")
    text = f"**{_pct(row['overall'])}**" + (f" [{_pct(interval[0])}, {_pct(interval[1])}]" if interval else "")
    return text + (" (≤ chance)" if chance is not None and row["overall"] <= chance else "")


def _delta_cell(delta: Optional[dict]) -> str:
    if not delta:
        return "—"
    lo, hi = delta["interval"]
    return f"{100 * delta['delta']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def format_group_table(group: dict, chance: Optional[float] = None) -> str:
    """Markdown table of a group: the baselines, then each variant, one row per NFE."""
    ref = group.get("reference")
    ref_nfe = ref["nfe"] if ref else "?"
    header = ["Student", "Setting", "NFE", "**Overall** [95% CI]", f"vs teacher@{ref_nfe}",
              "Δ vs baseline [95% paired CI]", "Verdict"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---:|---:|---:|---:|---|"]
    for arm in group["arms"]:
        entries = [(f"baseline: {group['baseline']}", arm["baseline_rows"], None)]
        entries += [(v["label"], v["rows"], _not_measured(v)) for v in arm["variants"]]
        for label, rows, missing in entries:
            if missing:
                lines.append(f"| {arm['method']} | {label} | — | {missing} | — | — | see verdicts |")
            for row in rows:
                rel, rel_ci = row.get("relative_to_teacher"), row.get("relative_interval")
                rel_text = "—" if rel is None else f"{100 * rel:.0f}%" + (
                    f" [{100 * rel_ci[0]:.0f}, {100 * rel_ci[1]:.0f}]" if rel_ci else "")
                verdict = (row["delta"] or {}).get("verdict", "—") if "delta" in row else "—"
                lines.append(f"| {arm['method']} | {label} | {row['nfe']} | {_score_cell(row, chance)} | "
                             f"{rel_text} | {_delta_cell(row.get('delta'))} | "
                             f"{verdict} |")
    return "\n".join(lines)


def _not_measured(variant: dict) -> Optional[str]:
    if variant.get("skipped"):
        return "skipped"
    return "training failed" if variant["error"] else None


def group_markdown(group: dict, chance: Optional[float] = None) -> str:
    ref = group.get("reference")
    lines = [f"## {group['title']} (`{group['name']}`)", "", f"Claim tested: {group['claim']}", "",
             format_group_table(group, chance), ""]
    if ref:
        lines += [f"Teacher at {ref['nfe']} steps: {_score_cell(ref, chance)} (the 100 % of the relative column). "
                  "Δ is in points of overall score; its interval is the paired bootstrap over the shared prompts.", ""]
    lines += [f"- {line}" for line in group["verdicts"]] + [""]
    for label, c in (group.get("curves") or {}).items():
        growth = c["grad_norm_growth"]
        lines.append(f"- curves, {label}: grad norm (before clipping) {_num(c['grad_norm_first_tenth'])} in the first "
                     f"tenth of training → {_num(c['grad_norm_last_tenth'])} in the last (×{_num(growth)}), max "
                     f"{_num(c['grad_norm_max'])}; last {c['loss_key']} {_num(c['loss_last'])}; "
                     f"{c['skipped_nonfinite']} non-finite steps skipped")
    return "\n".join(lines).rstrip() + "\n"


def _num(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def draw_group_plot(group: dict, path: Path) -> Path:
    """Overall score vs NFE (log axis), baseline and variants with their 95 % intervals, one panel per student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = group["arms"]
    fig, axes = plt.subplots(1, len(arms), figsize=(6 * len(arms), 4), squeeze=False)
    for ax, arm in zip(axes[0], arms):
        entries = [("baseline", arm["baseline_rows"])] + [(v["label"], v["rows"]) for v in arm["variants"]]
        for k, (label, rows) in enumerate(entries):
            rows = sorted(rows, key=lambda r: r["nfe"])
            if not rows:
                continue
            x = [r["nfe"] * (1 + 0.03 * k) for r in rows]  # a small offset keeps the error bars apart
            y = [100 * r["overall"] for r in rows]
            err = [[100 * (r["overall"] - r.get("overall_interval", [r["overall"]] * 2)[0]) for r in rows],
                   [100 * (r.get("overall_interval", [r["overall"]] * 2)[1] - r["overall"]) for r in rows]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label, color=f"C{k}")
        ref = group.get("reference")
        if ref:
            ax.axhline(100 * ref["overall"], color="0.4", linestyle="--", label=f"teacher@{ref['nfe']}")
        nfes = sorted({r["nfe"] for _, rows in entries for r in rows}) or [1]
        ax.set_xscale("log", base=2)
        ax.set_xlim(min(nfes) / 1.5, max(nfes) * 1.5)
        ax.set_xticks(nfes, [str(n) for n in nfes])
        ax.minorticks_off()
        ax.set_ylim(0, 100)
        ax.set_xlabel("NFE")
        ax.set_ylabel("overall score (%)")
        ax.set_title(f"{arm['method']}: {group['title']}", fontsize="small")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    return _save_figure(fig, path)


def draw_group_curves(group: dict, path: Path) -> Optional[Path]:
    """Loss and gradient norm (log axis) vs step of baseline and variants (:mod:`training.plot_metrics`)."""
    from training.plot_metrics import collect_series, default_keys, metrics_file, plot_series, read_records

    runs = {label: d for label, d in curve_runs(group).items() if (Path(d) / "logs" / "metrics.jsonl").is_file()}
    if not runs:
        return None
    keys = default_keys({d: read_records(metrics_file(d)) for d in runs.values()})
    series = collect_series(list(runs.values()), keys)
    label_of = {str(d).rstrip("/"): label for label, d in runs.items()}
    series = {key: {label_of[k]: v for k, v in per_run.items()} for key, per_run in series.items()}
    longest = max(len(steps) for per_run in series.values() for steps, _ in per_run.values())
    fig = plot_series(series, smooth=max(1, min(20, longest // 20)))  # a trailing mean over ≤ 5 % of the run
    for ax, key in zip(fig.axes, series):
        if key == "grad_norm":
            ax.set_yscale("log")
            ax.set_ylabel("grad norm (before clipping)")
    fig.suptitle(group["title"], fontsize="small")
    fig.tight_layout()
    return _save_figure(fig, path)


def _save_figure(fig, path: Path) -> Path:
    import os

    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_ablation_report(root: Path, results: dict) -> dict[str, Path]:
    """``summary.md``, ``ablations.json`` and per group ``table.md``, ``plot.png`` (and ``curves.png``)."""
    root.mkdir(parents=True, exist_ok=True)
    chance = results.get("chance")
    paths = {}
    sections = []
    for group in results["groups"]:
        folder = root / group["name"]
        folder.mkdir(exist_ok=True)
        text = group_markdown(group, chance)
        sections.append(text)
        _write_text(folder / "table.md", text)
        paths[f"{group['name']}/table.md"] = folder / "table.md"
        paths[f"{group['name']}/plot.png"] = draw_group_plot(group, folder / "plot.png")
        if "curves" in group:
            curves = draw_group_curves(group, folder / "curves.png")
            if curves is not None:
                paths[f"{group['name']}/curves.png"] = curves
        group["files"] = {k.split("/", 1)[1]: str(v) for k, v in paths.items() if k.startswith(group["name"] + "/")}
    intro = ("# Shapes-world ablations\n\nEach variant changes one option of the benchmark's student (the "
             "release's defaults); same seed, data, steps, prompts and sample seeds. \"Not separated\" means the "
             "95 % paired interval of Δ contains 0: the measurement cannot tell the two apart.\n")
    verdicts = ["## Verdicts", ""] + [f"- `{g['name']}`: {line}" for g in results["groups"] for line in g["verdicts"]]
    _write_text(root / "summary.md", "\n".join([intro, *verdicts, "", *sections]))
    _write_text(root / "ablations.json", json.dumps(results, indent=2) + "\n")
    paths["summary.md"], paths["ablations.json"] = root / "summary.md", root / "ablations.json"
    return paths
