"""Per-prompt scores and bootstrap intervals of GenEval's overall score (shapes benchmark and its ablations).

GenEval's overall score is the mean over tags of the tag's accuracy; with a fixed number of samples per
prompt that is overall = mean over tags of (mean over the tag's prompts of the prompt's fraction of
correct images). Every interval here resamples *prompts*, stratified by tag, because which prompts
happened to be drawn is the noise that separates two models scored on the same few prompts.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence, Union

import numpy as np

#: {tag: {prompt key: fraction of that prompt's images scored correct}}
PromptScores = dict[str, dict[str, float]]


def keyed_prompt_scores(rows: Sequence[dict]) -> PromptScores:
    """Scorer rows (one per image) → for each tag, each prompt's fraction of correct images, keyed by the
    prompt's metadata (the same key for every model sampled from one metadata file)."""
    hits: dict[tuple[str, str], list[int]] = {}
    for row in rows:
        key = json.dumps(row.get("metadata", {"prompt": row["prompt"]}), sort_keys=True)
        hits.setdefault((row["tag"], key), []).append(int(row["correct"]))
    out: PromptScores = {}
    for (tag, key), values in sorted(hits.items()):
        out.setdefault(tag, {})[key] = sum(values) / len(values)
    return out


def per_prompt_scores(rows: Sequence[dict]) -> dict[str, list[float]]:
    """Scorer rows (one per image) → for each tag, the fraction of correct images of each of its prompts."""
    return {tag: list(scores.values()) for tag, scores in keyed_prompt_scores(rows).items()}


def read_results(folder: Union[str, Path]) -> list[dict]:
    """The scorer rows of a scored sample folder (its ``results.jsonl``), read by GenEval's own reader."""
    from evaluation.summarize_geneval import load_results

    path = Path(folder) / "results.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: score the folder first (python -m evaluation.shapes.scorer)")
    return load_results(path)


def read_prompt_scores(folder: Union[str, Path]) -> PromptScores:
    """:func:`keyed_prompt_scores` of a scored sample folder (its ``results.jsonl``, written by the scorer)."""
    return keyed_prompt_scores(read_results(folder))


def bootstrap_interval(scores: dict[str, Sequence[float]], level: float = 0.95, n_boot: int = 4000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of GenEval's overall score over prompts.

    overall = mean over tags of (mean over the tag's prompts of the prompt's score); each replicate
    resamples every tag's prompts with replacement (stratified, as the statistic weights tags equally).
    Returns the (1 − level)/2 and (1 + level)/2 quantiles of the replicates.
    """
    if not scores or any(len(v) == 0 for v in scores.values()):
        raise ValueError("bootstrap_interval needs at least one prompt score per tag")
    rng = np.random.default_rng(seed)
    means = np.zeros(n_boot)
    for values in scores.values():
        arr = np.asarray(values, dtype=np.float64)
        picks = rng.integers(len(arr), size=(n_boot, len(arr)))
        means += arr[picks].mean(axis=1)
    means /= len(scores)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_differences(variant: PromptScores, baseline: PromptScores) -> dict[str, list[float]]:
    """Per-prompt score differences variant − baseline, tag by tag; both must hold the same prompts."""
    if set(variant) != set(baseline):
        raise ValueError(f"the two score sets cover different tags: {sorted(variant)} vs {sorted(baseline)}")
    out = {}
    for tag, scores in baseline.items():
        if set(scores) != set(variant[tag]):
            raise ValueError(f"tag {tag!r}: the two score sets hold different prompts; a paired comparison needs "
                             "both models sampled from the same metadata file")
        out[tag] = [variant[tag][key] - scores[key] for key in sorted(scores)]
    return out


def paired_difference(variant: PromptScores, baseline: PromptScores, level: float = 0.95, n_boot: int = 4000,
                      seed: int = 0) -> dict:
    """Overall(variant) − overall(baseline) with its paired bootstrap interval over prompts.

    Both models were sampled on the same prompts with the same seeds, so each replicate draws one set of
    prompts (stratified by tag) and scores both models on it: since overall is linear in the prompt scores,
    that is the stratified bootstrap of the per-prompt differences d_i = s_i(variant) − s_i(baseline), whose
    interval is narrower than the unpaired one whenever the two models agree on which prompts are hard.
    """
    diffs = paired_differences(variant, baseline)
    lo, hi = bootstrap_interval(diffs, level, n_boot, seed)
    delta = float(np.mean([np.mean(v) for v in diffs.values()]))
    return {"delta": delta, "interval": [lo, hi], "level": level, "verdict": verdict(lo, hi)}


def paired_ratio(variant: PromptScores, reference: PromptScores, level: float = 0.95, n_boot: int = 4000,
                 seed: int = 0) -> dict:
    """overall(variant) / overall(reference) with its paired bootstrap interval over prompts.

    The paper reads a student as a fraction of its teacher (e.g. sCM at 2 steps >= 95 % of the teacher at 28);
    both were sampled on the same prompts with the same seeds, so each replicate draws one set of prompts
    (stratified by tag, the same indices for both) and takes the ratio of the two overall scores on it.
    Replicates whose reference overall is 0 are dropped (the ratio is undefined there).
    """
    paired_differences(variant, reference)  # same tags and prompts, or a ValueError that says so
    rng = np.random.default_rng(seed)
    num, den = np.zeros(n_boot), np.zeros(n_boot)
    for tag, scores in reference.items():
        keys = sorted(scores)
        ref = np.asarray([scores[k] for k in keys], dtype=np.float64)
        var = np.asarray([variant[tag][k] for k in keys], dtype=np.float64)
        picks = rng.integers(len(keys), size=(n_boot, len(keys)))
        num += var[picks].mean(axis=1)
        den += ref[picks].mean(axis=1)
    overall_ref = float(np.mean([np.mean(list(s.values())) for s in reference.values()]))
    if overall_ref <= 0:
        raise ValueError("the reference scores 0 on every prompt: a ratio to it is undefined")
    overall_var = float(np.mean([np.mean(list(s.values())) for s in variant.values()]))
    ratios = num[den > 0] / den[den > 0]
    lo, hi = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return {"ratio": overall_var / overall_ref, "interval": [float(lo), float(hi)], "level": level}


def verdict(lo: float, hi: float) -> str:
    """'better' / 'worse' when the whole interval of variant − baseline lies above / below 0, else
    'not separated' (the interval contains 0: the data do not tell the two apart at this level)."""
    if lo > 0:
        return "better"
    if hi < 0:
        return "worse"
    return "not separated"
