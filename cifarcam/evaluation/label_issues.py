"""Likely label errors in a test set, found by confident learning (cleanlab) from a model's
test-set probabilities. They are out of sample, as confident learning needs: the model never
trained on a test image. Ranked by the self-confidence label-quality score, the probability the
model gives the given label: the lower, the more likely the label is wrong."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from cifarcam.errors import CifarcamError, RunError

# Fewer test images of a class than this leave confident learning's per-class thresholds and
# noise rates without support; cleanlab itself only warns.
MIN_IMAGES_PER_CLASS = 5
EXTRA_HINT = 'pip install "cifarcam[labels]"'


@dataclass(frozen=True)
class LabelIssues:
    indices: torch.Tensor  # the flagged test images, most likely label error first
    quality: torch.Tensor  # every test image's label-quality score in [0, 1]

    def mask(self, count: int) -> torch.Tensor:
        """A bool per test image (`count` of them): flagged or not."""
        flagged = torch.zeros(count, dtype=torch.bool)
        flagged[self.indices] = True
        return flagged


def find_label_issues(probs: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> LabelIssues:
    """Confident learning's label issues among `labels`, given (N, K) softmax `probs`."""
    try:
        from cleanlab.filter import find_label_issues as cleanlab_find
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        raise CifarcamError(
            "finding label issues needs cleanlab, which is not installed", hint=EXTRA_HINT
        ) from None
    counts = torch.bincount(labels, minlength=len(classes))
    if counts.min() < MIN_IMAGES_PER_CLASS:
        fewest = int(counts.argmin())
        raise RunError(
            f"finding label issues needs at least {MIN_IMAGES_PER_CLASS} test images of every class; "
            f"class '{classes[fewest]}' has {int(counts[fewest])} of the {len(labels)} test images"
        )
    given, pred_probs = labels.numpy(), probs.double().numpy()
    with warnings.catch_warnings():  # cleanlab warns about what the checks above already refuse
        warnings.simplefilter("ignore")
        ranked = cleanlab_find(given, pred_probs, return_indices_ranked_by="self_confidence", n_jobs=1)
        quality = get_label_quality_scores(given, pred_probs, method="self_confidence")
    return LabelIssues(torch.as_tensor(ranked, dtype=torch.long), torch.as_tensor(quality))


def label_issue_entries(
    issues: LabelIssues, probs: torch.Tensor, labels: torch.Tensor, classes: list[str]
) -> list[dict[str, object]]:
    """One record per flagged test image, in rank order: given and suggested (most probable)
    label, label-quality score and the model's confidence in the suggestion."""
    confidence, suggested = probs[issues.indices].max(dim=1)
    return [
        {
            "index": int(i),
            "given": classes[int(labels[i])],
            "suggested": classes[int(s)],
            "given_label": int(labels[i]),
            "suggested_label": int(s),
            "quality": float(issues.quality[i]),
            "confidence": float(c),
        }
        for i, s, c in zip(issues.indices, suggested, confidence, strict=True)
    ]


def label_issue_marks(
    probs: torch.Tensor, labels: torch.Tensor, classes: list[str]
) -> tuple[torch.Tensor | None, str | None]:
    """For commands that mark label issues where they can: a bool per test image, or None and
    the reason they cannot be found (cleanlab missing, too few test images)."""
    try:
        issues = find_label_issues(probs, labels, classes)
    except CifarcamError as error:
        return None, error.message + (f" ({error.hint})" if error.hint else "")
    return issues.mask(len(labels)), None
