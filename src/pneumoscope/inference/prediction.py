"""The Prediction record: one image's answer, as predict writes it, and the columns of its rows."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one image: what ``pneumoscope predict`` writes as a row.

    ``label`` is the class decided at ``threshold`` only for an image the model can assess: it is
    None when the image could not be read (``error`` says why) and when it is not assessable
    (``ood`` is True: the image screen or the out-of-distribution guard flagged it, and
    ``ood_reason`` says why). ``prob`` is then given for information only.

    A model of N > 2 classes adds ``probs`` (class -> calibrated probability); its ``prob`` is the screening
    probability P(not normal) and ``label`` is the normal class below ``threshold``, else the most probable of the
    other classes: the screening decision and the class it points to cannot disagree.

    Attributes:
        path: the input as given (a path, or a description of an in-memory input).
        prob: calibrated P(PNEUMONIA) (N classes: P(not normal)), or None when the image could not be read.
        label: "NORMAL" or "PNEUMONIA" (N classes: the class decided as above), or None (not assessable, or unreadable).
        threshold: the model's operating point; ``label`` is PNEUMONIA (not normal) where ``prob >= threshold``.
        ood: True when not assessable; False when checked and like the training images; None when the model has no guard.
        ood_distance: the guard's score (Mahalanobis distance of the image's features to the training features).
        error: why the image could not be read, else "".
        ood_reason: why it is not assessable, else "".
        probs: N classes only: each class's calibrated probability (softmax), in the model's class order; else None.
    """

    path: str
    prob: float | None
    label: str | None
    threshold: float
    ood: bool | None = None
    ood_distance: float | None = None
    error: str = ""
    ood_reason: str = ""
    probs: dict[str, float] | None = None

    @property
    def assessable(self) -> bool:
        """Whether the model gives a diagnosis for this image (readable, and neither screen nor guard flagged it)."""
        return self.label is not None

    FIELDS = ("path", "prob", "label", "threshold", "ood", "ood_distance", "ood_reason", "error")

    def to_dict(self) -> dict:
        """The record as ``pneumoscope predict --format json`` writes it.

        Returns:
            A dict of :attr:`FIELDS`, in that order (``label``, ``prob`` and the rest as above; None where absent), then
            for an N-class model ``prob_<CLASS>`` for each class (None where the image could not be read).
        """
        out = {k: getattr(self, k) for k in self.FIELDS}
        if self.probs is not None:
            out.update({f"prob_{c}": p for c, p in self.probs.items()})
        return out


def prediction_fields(class_names) -> tuple[str, ...]:
    """The columns of ``predict``'s rows for a model of these classes: :attr:`Prediction.FIELDS`, then for N > 2
    classes one probability column per class."""
    return Prediction.FIELDS if len(class_names) == 2 else (*Prediction.FIELDS, *(f"prob_{c}" for c in class_names))
