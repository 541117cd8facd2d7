"""The report's comparison of a model with its random twin: which models are compared, and the diagnosis table.

For a checkpoint ``ckpt`` whose model the report shows (``subject``: its
teacher, or its student when it has no teacher), the models compared are

* ``random init``: the run's random twin, ``load_model_source(random_like=ckpt, seed=seed)`` as eval-all
  draws it (the same architecture, the seeded initialisation; the student's own starting weights). Only
  for a training checkpoint of ours (it records its training args): a released backbone has none;
* ``DINO (teacher)`` (or ``DINO (student)``): the model itself;
* ``DINO (student)``: beside a teacher, the checkpoint's student when the file holds one (a bare state
  dict answers every key with the same weights: it is left out).

`diagnoses_html` lays out `evaluate.emergence.diagnose`'s numbers: one row per diagnostic, one column
per model, and a line on how to read them.
"""
from __future__ import annotations

import html

from common.errors import UserError
from evaluate.emergence import RANDOM_TWIN, ROWS, STUDENT, TEACHER, format_value
from evaluate.model_source import ModelSource, load_model_source


def random_twin(subject: ModelSource | None, ckpt: str, seed: int = 0) -> ModelSource | None:
    """The run's random twin for a training checkpoint of ours; None for any other model."""
    if subject is None or subject.random or not subject.train_args:
        return None
    return load_model_source(key=subject.key, random_like=ckpt, seed=seed)


def trained_student(subject: ModelSource | None, ckpt: str, seed: int = 0) -> ModelSource | None:
    """The checkpoint's student beside the teacher ``subject``; None when the file holds no other student."""
    if subject is None or subject.random or subject.key != "teacher":
        return None
    try:
        student = load_model_source(ckpt, key="student", seed=seed)
    except UserError:
        return None
    return student if student.weights != subject.weights else None


def trained_label(subject: ModelSource) -> str:
    """The model's column: random init, DINO (teacher) or DINO (student)."""
    if subject.random:
        return RANDOM_TWIN
    return TEACHER if subject.key == "teacher" else STUDENT


def compared_models(subject: ModelSource, ckpt: str, seed: int = 0) -> dict[str, ModelSource]:
    """{column: model}, in order: the random twin (when there is one), the model, the student (when there is one)."""
    models = {}
    twin = random_twin(subject, ckpt, seed)
    if twin is not None:
        models[RANDOM_TWIN] = twin
    models[trained_label(subject)] = subject
    student = trained_student(subject, ckpt, seed)
    if student is not None:
        models[STUDENT] = student
    return models


def diagnoses_html(diagnoses: dict[str, dict]) -> str:
    """A table of ``diagnoses`` ({column: diagnosis}), `ROWS` down, models across, and how to read it."""
    head = "<th>diagnostic</th>" + "".join(f"<th>{html.escape(name)}</th>" for name in diagnoses)
    rows = "".join(f'<tr><td class="text">{html.escape(label)}</td>'
                   + "".join(f"<td>{html.escape(format_value(key, diagnosis.get(key)))}</td>"
                             for diagnosis in diagnoses.values()) + "</tr>" for key, label in ROWS.items())
    sizes = next(iter(diagnoses.values()))["image_sizes"]
    return (f'<div class="scroll"><table><tr>{head}</tr>{rows}</table></div>'
            f"<p>Features that cluster: the k-NN top-1 rises, the mean pairwise cosine of the L2-normalised [CLS] "
            f"features falls (1: all in one direction), the effective rank (exp of the entropy of their "
            f"covariance spectrum) rises; classification val split at {sizes['knn'] or '-'} px. Heads that land "
            f"on the object: the share of each head's [CLS] attention on object pixels of the VOC val images at "
            f"{sizes['voc'] or '-'} px, against the object area (the share of a uniform attention).</p>")
