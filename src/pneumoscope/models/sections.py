"""The shapes of a run description's JSON sections (training, leakage, calibration, adaptation): typed, as written.

They stay JSON objects in the checkpoint (so older files read as they were, and keys a later version adds are kept);
these types declare what each section holds, for readers and type checkers, and tests keep them the written keys.
"""

from typing import NotRequired, TypedDict


class TrainingSection(TypedDict):
    """How the run was trained: its data, the head's fit, the stage, and stage 2's facts when it ran."""

    data: str  # the data folder, absolute
    layout: str  # kaggle, class-folders, npz, ...
    best_epoch: int
    epochs_run: int
    n_train: int
    n_val: int
    seed: int
    labels: NotRequired[str]  # a label source other than the class folders (pneumonia-type)
    stage: str  # in words: head on frozen features, or fine-tuned
    finetune: NotRequired[dict]  # stage 2: world size, precision, resume point, best AUC, epochs, speed, augmentation
    mlflow: NotRequired[dict]  # the MLflow run logged to


class LeakageSection(TypedDict):
    """The leakage check at training: patients in several splits and byte-identical copies across splits."""

    ok: bool
    patients_in_several_splits: int
    duplicates_across_splits: int
    duplicate_examples: list


class CalibrationSection(TypedDict):
    """What ``calibrate`` fitted on a labelled local sample, and the images it used (by content hash)."""

    method: str
    data: str
    split: str
    n: int
    n_positive: int  # N classes: images not of the normal class
    n_per_class: NotRequired[dict[str, int]]  # N classes
    date: str
    previous_threshold: float
    previous_temperature: float
    image_sha256: list[str]
    metrics_on_sample: dict  # the clinical table (and, N classes, the classes' table) on the sample
    skipped: int


class ShiftBrief(TypedDict):
    """A site's shift in brief, before or after adaptation."""

    mmd_p_value: float
    domain_auc: float
    prevalence: dict  # predicted positive rate, bbse, em, mixture, mean probability
    ood_fraction: float | None


class AdaptationSection(TypedDict):
    """What ``adapt`` fitted on a site's unlabelled images, and the images it used (by content hash)."""

    method: str
    data: str
    n: int
    date: str
    labels_used: bool  # always False: no label is read from the site's folders
    estimated_prevalence: float  # the share not normal (the positive class's, for two classes)
    estimated_class_priors: NotRequired[dict[str, float]]  # N classes: the EM priors
    prior_logit_offset: float | list[float]  # 0 without +prior; N classes: one a class
    previous_threshold: float
    shift_before: ShiftBrief
    shift_after: ShiftBrief
    image_sha256: list[str]
    skipped: int
