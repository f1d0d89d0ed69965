"""The paper's claims that a depth x shortcut sweep can test, checked on the sweep's records.

A pure function of reports/sweep.json's records (`claims`): the report stage writes its verdicts
to claims.json and results.md, and benchmarks/claims.py runs it on several seeds. Each claim has
a verdict (held, not held, or not tested when the sweep lacks the nets it needs) and the numbers
behind it; the thresholds below say what "held" means, each beside the paper's section.
"""

from __future__ import annotations

from fractions import Fraction

from pipeline.artifacts import Record
from pipeline.records import FailedTrial, TrialRecord

RESIDUAL = ("A", "B", "C")

# The claims' thresholds, errors as fractions of the images (0.02: two points of error).
# a. Degradation (Sec. 4.1, Fig. 4 left; Sec. 4.2, Fig. 6 left): the deepest plain net's final
#    train error exceeds the shallowest's by more than this.
DEGRADATION_MIN_GAP = 0.0
# b. Residual learning fixes it (Sec. 4.1, Table 2; Fig. 6 middle): at the deepest depth, the
#    ResNet (A)'s final train error is under this fraction of the plain net's.
RESIDUAL_MAX_RATIO = 1 / 3
# c. ResNets gain from depth (Table 6, Fig. 6 middle): the deepest ResNet (A)'s final train
#    error is at most this much above the shallowest's (or below it).
DEPTH_TOLERANCE = 0.02
# d. Shortcut options (Sec. 4.1, Table 3): A, B and C each beat plain (best val error) at the
#    deepest depth, where plain nets degrade (Table 3 compares at 34 layers; at 18 the paper
#    finds plain and residual "comparably accurate", Table 2), and at every depth their best
#    val errors span at most this much.
SHORTCUT_MAX_SPREAD = 0.02
# Errors are counts over a split (k/n); their differences carry float rounding
# (0.05 - 0.03 = 0.020000000000000004), which must not decide an at-most comparison.
ROUNDING = 1e-9


class Claim(Record):
    """One claim's verdict: held is True, False, or None when the sweep lacks what the claim needs
    (then evidence["reason"] says what)."""

    id: str
    claim: str
    held: bool | None
    evidence: dict[str, object]


# The sweep's finished trials by (depth, shortcut).
Nets = dict[tuple[int, str], TrialRecord]


def claims(trials: list[TrialRecord | FailedTrial]) -> list[Claim]:
    """The paper's claims that the sweep's records can test, in order a-e. A failed trial is left
    out, and named in every claim's evidence["skipped_failed_trials"]; so is a trial a scheduler
    stopped early (its final errors are an early epoch's), under "skipped_stopped_early_trials"."""
    failed = [t.trial.label for t in trials if isinstance(t, FailedTrial)]
    finished = [t for t in trials if isinstance(t, TrialRecord)]
    stopped = [t.trial.label for t in finished if t.stopped_early]
    nets = {(t.depth, t.shortcut): t for t in finished if not t.stopped_early}
    results = [
        degradation(nets),
        residual_fixes_degradation(nets),
        residual_gains_from_depth(nets),
        shortcut_options(nets),
        parameter_counts(nets),
    ]
    skipped = {
        key: names for key, names in (("skipped_failed_trials", failed), ("skipped_stopped_early_trials", stopped)) if names
    }
    return [result.model_copy(update={"evidence": {**result.evidence, **skipped}}) for result in results]


def depths_of(nets: Nets, *shortcuts: str) -> list[int]:
    """The depths at which the sweep has a finished trial of every one of these shortcuts."""
    return sorted({d for d, _ in nets if all((d, s) in nets for s in shortcuts)})


def final_train_errors(nets: Nets, shortcut: str, *depths: int) -> tuple[float, ...]:
    """The final train errors of the nets of one shortcut at `depths`: what claims a-c compare."""
    return tuple(nets[(depth, shortcut)].final_train_top1_error for depth in depths)


def verdict(claim_id: str, claim: str, held: bool | None, evidence: dict[str, object]) -> Claim:
    return Claim(id=claim_id, claim=claim, held=held, evidence=evidence)


def degradation(nets: Nets) -> Claim:
    claim = (
        "a. Degradation (Sec. 4.1-4.2, Fig. 6 left): the deepest plain net ends training with a higher "
        "train error than the shallowest one"
    )
    depths = depths_of(nets, "none")
    if len(depths) < 2:
        reason = f"needs finished plain nets at two depths or more; the sweep has them at {depths or 'none'}"
        return verdict("degradation", claim, None, {"reason": reason, "plain_depths": depths})
    shallow, deep = final_train_errors(nets, "none", depths[0], depths[-1])
    evidence = {
        "shallow_depth": depths[0],
        "deep_depth": depths[-1],
        "plain_shallow_final_train_error": shallow,
        "plain_deep_final_train_error": deep,
        "gap": deep - shallow,
        "min_gap": DEGRADATION_MIN_GAP,
    }
    return verdict("degradation", claim, deep - shallow > DEGRADATION_MIN_GAP, evidence)


def residual_fixes_degradation(nets: Nets) -> Claim:
    claim = (
        "b. Residual learning fixes it (Sec. 4.1-4.2, Fig. 6): at the deepest depth, ResNet (A) ends "
        f"training with under {Fraction(RESIDUAL_MAX_RATIO).limit_denominator(100)} of the plain net's train error"
    )
    depths = depths_of(nets, "none", "A")
    if not depths:
        reason = "needs a finished plain net and ResNet (A) at the same depth; the sweep has none"
        return verdict("residual_fixes_degradation", claim, None, {"reason": reason})
    depth = depths[-1]
    plain = nets[(depth, "none")].final_train_top1_error
    resnet = nets[(depth, "A")].final_train_top1_error
    evidence = {
        "depth": depth,
        "plain_final_train_error": plain,
        "resnet_A_final_train_error": resnet,
        "ratio": resnet / plain if plain > 0 else None,
        "max_ratio": RESIDUAL_MAX_RATIO,
    }
    return verdict("residual_fixes_degradation", claim, resnet < RESIDUAL_MAX_RATIO * plain, evidence)


def residual_gains_from_depth(nets: Nets) -> Claim:
    claim = (
        "c. ResNets gain from depth (Table 6, Fig. 6 middle): the deepest ResNet (A) ends training with a "
        f"train error at most {DEPTH_TOLERANCE:.0%} above the shallowest one's, or below it"
    )
    depths = depths_of(nets, "A")
    if len(depths) < 2:
        reason = f"needs finished ResNets (A) at two depths or more; the sweep has them at {depths or 'none'}"
        return verdict("residual_gains_from_depth", claim, None, {"reason": reason, "resnet_A_depths": depths})
    shallow, deep = final_train_errors(nets, "A", depths[0], depths[-1])
    evidence = {
        "shallow_depth": depths[0],
        "deep_depth": depths[-1],
        "resnet_A_shallow_final_train_error": shallow,
        "resnet_A_deep_final_train_error": deep,
        "difference": deep - shallow,
        "tolerance": DEPTH_TOLERANCE,
    }
    return verdict("residual_gains_from_depth", claim, deep - shallow <= DEPTH_TOLERANCE + ROUNDING, evidence)


def incomplete_depths(nets: Nets, complete: list[int]) -> list[int]:
    return sorted({d for d, _ in nets} - set(complete))


def shortcut_options(nets: Nets) -> Claim:
    claim = (
        "d. Shortcut options (Sec. 4.1, Table 3): at the deepest depth, ResNets with options A, B and C all beat "
        f"the plain net (best val error), and at each depth they differ among themselves by at most {SHORTCUT_MAX_SPREAD:.0%}"
    )
    depths = depths_of(nets, "none", *RESIDUAL)
    if not depths:
        reason = "needs finished plain, A, B and C nets at the same depth; the sweep has no such depth"
        return verdict("shortcut_options", claim, None, {"reason": reason})
    rows = []
    for depth in depths:
        errors = {s: nets[(depth, s)].best_val_top1_error for s in ("none", *RESIDUAL)}
        residual = [errors[s] for s in RESIDUAL]
        spread = max(residual) - min(residual)
        beat_plain = all(e < errors["none"] for e in residual)
        must_beat_plain = depth == depths[-1]
        rows.append(
            {
                "depth": depth,
                **{f"{'plain' if s == 'none' else s}_best_val_error": e for s, e in errors.items()},
                "spread": spread,
                "all_beat_plain": beat_plain,
                "held": (beat_plain or not must_beat_plain) and spread <= SHORTCUT_MAX_SPREAD + ROUNDING,
            }
        )
    evidence = {"depths": rows, "max_spread": SHORTCUT_MAX_SPREAD, "untested_depths": incomplete_depths(nets, depths)}
    return verdict("shortcut_options", claim, all(r["held"] for r in rows), evidence)


def parameter_counts(nets: Nets) -> Claim:
    claim = (
        "e. Parameters (Sec. 3.3 and 4.1, Table 3): at each depth, option A (zero-padding identity shortcuts) adds "
        "no parameters to the plain net; B (projections where dimensions grow) and C (all projections) "
        "add some, C more than B"
    )
    depths = depths_of(nets, "none", *RESIDUAL)
    if not depths:
        reason = "needs finished plain, A, B and C nets at the same depth; the sweep has no such depth"
        return verdict("parameter_counts", claim, None, {"reason": reason})
    rows = []
    for depth in depths:
        plain, a, b, c = (nets[(depth, s)].num_params for s in ("none", *RESIDUAL))
        rows.append(
            {
                "depth": depth,
                "plain_num_params": plain,
                "A_num_params": a,
                "B_num_params": b,
                "C_num_params": c,
                "held": a == plain and c > b > a,
            }
        )
    evidence = {"depths": rows, "untested_depths": incomplete_depths(nets, depths)}
    return verdict("parameter_counts", claim, all(r["held"] for r in rows), evidence)
