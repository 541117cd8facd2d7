"""``make report``: one self-contained HTML page of what a run learned.

    python -m analysis.report --ckpt runs/demo/checkpoint.pth                    # -> results/demo/report.html
    python -m analysis.report --ckpt runs/x/checkpoint.pth --data-root /data/dino --images photos/

The page (``<out>/report.html``, ``--out`` defaulting to eval-all's folder
``results/<run>``) holds, in order: the model and the run's configuration;
the training curves and collapse monitors (`analysis.curves`, from the
``log.jsonl`` beside the checkpoint); every table that ``make eval-all``
wrote in ``<out>`` with the paper's rows beside ours; the emergence
diagnosis (`evaluate.emergence`: 20-NN top-1, feature geometry, [CLS]
attention on the objects) of the random twin, the model and, beside a
teacher, the checkpoint's student; and the figures: attention maps
(`analysis.attention`, the random twin's beside the model's on the same
images), t-SNE and k-NN neighbours
(`analysis.embeddings`), retrieval and copy-detection hits
(`analysis.neighbours`), DAVIS propagation (`analysis.propagation`, from
eval-all's predictions). The PNGs are written to ``<out>/figures/`` and
embedded in the page as data URIs, so the HTML file alone is the report.
The model flags are every evaluator's (`evaluate.model_source`): ``--ckpt``
(or ``random`` with ``--arch``/``--patch``), ``--key`` (default teacher: the
student, with a warning, when the checkpoint has no teacher), ``--seed``;
``--random-like`` is refused, as the page already shows the random twin beside
its model. The random twin (`evaluate.model_source.load_model_source` with
``random_like``, seeded as eval-all's) exists for training checkpoints of ours (they record
their training args); for other checkpoints (released backbones) it is left
out without a warning.

Each section is built on its own: one that cannot be (no eval-all tables
yet, a truncated log line, an image that is not an image, a checkpoint with
no teacher) becomes a warning listed at the top of the page and printed,
and the others are still produced. Settings follow `evaluate.eval_plan`
(the suite's scaled sizes on the embedded suite, the paper's on real data).
Exit status: 0 when the page was written (warnings included), 1 when a
section failed unexpectedly, 2 when the checkpoint itself is unusable and
there is no training log either (nothing to report).
"""
from __future__ import annotations

import argparse
import base64
import datetime
import html
import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from common.atomic import atomic_write_text
from common.errors import UserError, one_line_message, run_cli
from evaluate import results_table as rt
from evaluate.emergence import RANDOM_TWIN
from evaluate.eval_plan import find_part, plan
from evaluate.features import FeatureExtractor, default_device
from evaluate.model_source import (
    RANDOM,
    ModelSource,
    add_device_argument,
    add_model_arguments,
    load_model_source,
    run_name,
)

from . import curves
from .emergence import compared_models, diagnoses_html, random_twin, trained_label
from .figures import FigureFile, FigureSet

ATTENTION_IMAGES = 4
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
.scroll { overflow-x: auto; } table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: .85em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th { background: #f3f3f3; } td.text { text-align: left; }
tr.measured td { background: #eaf4ff; font-weight: 600; }
.warnings { background: #fff6dd; border: 1px solid #e8c66a; padding: .6em 1em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .85em; color: #555; }
.side-by-side { display: grid; grid-template-columns: 1fr 1fr; gap: 0 1em; align-items: start; }
.side-by-side > b { text-align: center; }
"""


@dataclass
class Section:
    """One part of the page: its title, HTML body, and the warnings it produced."""
    title: str
    body: str = ""
    warnings: list[str] = field(default_factory=list)
    failed: bool = False


@dataclass
class ReportInputs:
    """What the sections read: the model (or None), its run's folder and log, the data, where to write."""
    ckpt: str
    out: Path
    data_root: Path | None
    run_dir: Path | None
    subject: ModelSource | None
    images: list[Path]
    device: torch.device
    seed: int = 0


# ---------------------------------------------------------------- HTML pieces
def figure_html(figure: FigureFile) -> str:
    """A <figure> with the PNG embedded as a data URI."""
    data = base64.b64encode(Path(figure.path).read_bytes()).decode("ascii")
    caption = html.escape(figure.title + (f": {figure.caption}" if figure.caption else ""))
    return (f'<figure><img alt="{html.escape(figure.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{caption}</figcaption></figure>")


def key_value_table(values: dict) -> str:
    rows = "".join(f'<tr><td class="text">{html.escape(str(key))}</td>'
                   f'<td class="text">{html.escape(str(value))}</td></tr>'
                   for key, value in values.items())
    return f"<table><tr><th>setting</th><th>value</th></tr>{rows}</table>"


def results_table_html(frame) -> str:
    """One eval-all table, wide: a row per (method, arch, patch, source, extra columns), a column per metric."""
    keys = [column for column in frame.columns if column not in ("table", "metric", "value")]
    metrics = list(dict.fromkeys(frame["metric"]))
    groups = frame.groupby(keys, sort=False, dropna=False)
    head = "".join(f"<th>{html.escape(name)}</th>" for name in keys + metrics)
    rows = []
    for group_key, group in groups:
        values = dict(zip(group["metric"], group["value"]))
        cells = "".join(f'<td class="text">{html.escape(_cell(value))}</td>' for value in group_key)
        cells += "".join(f"<td>{_number(values.get(metric))}</td>" for metric in metrics)
        css = "measured" if dict(zip(keys, group_key)).get("source") == "measured" else "paper"
        rows.append(f'<tr class="{css}">{cells}</tr>')
    return f'<div class="scroll"><table><tr>{head}</tr>{"".join(rows)}</table></div>'


def _cell(value) -> str:
    return "" if value is None or value != value else str(value)  # NaN != NaN


def _number(value) -> str:
    if value is None or value != value:
        return ""
    return f"{value:.2f}" if isinstance(value, float) else html.escape(str(value))


# ---------------------------------------------------------------- sections
def model_section(inputs: ReportInputs) -> Section:
    section = Section("Model and configuration")
    facts = {"checkpoint": inputs.ckpt, "run": inputs.out.name}
    if inputs.subject is not None:
        facts.update({f"model {key}": value for key, value in inputs.subject.spec.items()})
        facts["weights fingerprint"] = inputs.subject.weights
    config = training_config(inputs)
    section.body = key_value_table(facts)
    if config:
        section.body += f"<details><summary>training configuration ({len(config)} settings)</summary>" \
                        f"{key_value_table(config)}</details>"
    else:
        section.warnings.append("no training configuration found (not in the checkpoint, no config.json beside it)")
    return section


def training_config(inputs: ReportInputs) -> dict:
    """The run's resolved config: the checkpoint's ``args``, else ``config.json`` in the run folder."""
    if inputs.subject is not None and inputs.subject.train_args:
        return dict(inputs.subject.train_args)
    path = inputs.run_dir / "config.json" if inputs.run_dir else None
    if path and path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            return {}
    return {}


def training_section(inputs: ReportInputs) -> Section:
    section = Section("Training")
    log_path = inputs.run_dir / "log.jsonl" if inputs.run_dir else None
    if log_path is None or not log_path.is_file():
        section.warnings.append(f"no training log beside the checkpoint ({log_path}): curves skipped")
        return section
    result = curves.curve_figures(log_path, inputs.out / "figures", training_config(inputs).get("out_dim"))
    summary = curves.read_log(log_path).summary
    section.body = "".join(figure_html(figure) for figure in result.figures)
    if summary:
        section.body += key_value_table({key: round(value, 3) if isinstance(value, float) else value
                                         for key, value in summary.items() if key != "kind"})
    section.warnings += result.problems
    return section


def tables_section(inputs: ReportInputs) -> Section:
    section = Section("Evaluation tables (ours highlighted, the paper's rows beside)")
    found = [(table, inputs.out / f"{table}.csv") for table in rt.TABLES if (inputs.out / f"{table}.csv").is_file()]
    if not found:
        section.warnings.append(f"no eval-all tables in '{inputs.out}': run make eval-all CKPT={inputs.ckpt} first")
        return section
    for table, path in found:
        section.body += f"<h3>{html.escape(table)}</h3>{results_table_html(rt.read_table(path))}"
    return section


def figures_section(title: str, make: Callable[[], FigureSet]) -> Section:
    section = Section(title)
    result = make()
    section.body = "".join(figure_html(figure) for figure in result.figures)
    section.warnings += result.problems
    return section


def needs(inputs: ReportInputs, part: str | None = None) -> Path | None:
    """The data part's folder; UserError when the model or the part is missing."""
    if inputs.subject is None:
        raise UserError("no model loaded: figures that need one are skipped")
    if part is None:
        return None
    folder = find_part(inputs.data_root, part) if inputs.data_root and inputs.data_root.is_dir() else None
    if folder is None:
        raise UserError(f"no {part} data under '{inputs.data_root}': pass --data-root (make data writes data/suite)")
    return folder


def extractor(inputs: ReportInputs, subject: ModelSource | None = None) -> FeatureExtractor:
    """The model (or ``subject``'s) with eval-all's feature cache (``<out>/features``): features eval-all
    extracted are reused."""
    return FeatureExtractor((subject or inputs.subject).model, inputs.device, num_workers=0,
                            cache_dir=inputs.out / "features", progress=False)


def planned(inputs: ReportInputs, kind: str) -> dict:
    """The eval-all settings of ``kind`` for this model and data root ({} when not planned)."""
    evaluations, _ = plan(inputs.data_root, inputs.subject.info())
    return next((evaluation.settings for evaluation in evaluations if evaluation.kind == kind), {})


def emergence_section(inputs: ReportInputs) -> Section:
    from evaluate.emergence import diagnose
    needs(inputs)
    if inputs.data_root is None:
        raise UserError("no data root: the emergence diagnosis is skipped (pass --data-root)")
    models = compared_models(inputs.subject, inputs.ckpt, inputs.seed)
    diagnoses = {name: diagnose(extractor(inputs, subject), inputs.data_root, subject.train_args)
                 for name, subject in models.items()}
    return Section("Emergence", diagnoses_html(diagnoses))


def attention_section(inputs: ReportInputs) -> Section:
    from .attention import attention_figures
    needs(inputs)
    images = inputs.images or default_attention_images(inputs)
    size = planned(inputs, "voc").get("image_size", 480) if inputs.data_root else 480

    def draw(subject: ModelSource, name: str = "") -> FigureSet:
        return attention_figures(subject.model, images, inputs.out / "figures", image_size=size,
                                 device=inputs.device, progress=False, model_name=name)

    section = Section("Attention maps")
    trained = draw(inputs.subject)
    section.warnings += trained.problems
    twin = random_twin(inputs.subject, inputs.ckpt, inputs.seed)
    if twin is None:
        section.body = "".join(figure_html(figure) for figure in trained.figures)
        return section
    random = draw(twin, RANDOM_TWIN)  # the same images: the same problems, not listed twice
    cells = "".join(figure_html(left) + figure_html(right) for left, right in zip(random.figures, trained.figures))
    section.body = (f'<div class="side-by-side"><b>{html.escape(RANDOM_TWIN)}</b>'
                    f"<b>{html.escape(trained_label(inputs.subject))}</b>{cells}</div>")
    return section


def default_attention_images(inputs: ReportInputs) -> list[Path]:
    """The first `ATTENTION_IMAGES` images of the VOC part (else the classification val split)."""
    voc = find_part(inputs.data_root, "voc") if inputs.data_root and inputs.data_root.is_dir() else None
    if voc is not None:
        candidates = sorted(voc.rglob("JPEGImages/*.jpg"))
    else:
        classification = needs(inputs, "classification")
        candidates = sorted((classification / "val").rglob("*.*"))
    if not candidates:
        raise UserError(f"no images for the attention maps under '{inputs.data_root}': pass --images")
    return candidates[:ATTENTION_IMAGES]


def embeddings_section(inputs: ReportInputs) -> Section:
    from .embeddings import embedding_figures
    folder = needs(inputs, "classification")
    crop = planned(inputs, "knn").get("image_size")
    return figures_section("Embeddings: t-SNE and nearest neighbours", lambda: embedding_figures(
        extractor(inputs), folder, inputs.out / "figures", crop_size=crop, seed=inputs.seed, progress=False))


def neighbours_section(inputs: ReportInputs) -> Section:
    from .neighbours import neighbour_figures
    needs(inputs)
    return figures_section("Retrieval and copy detection", lambda: neighbour_figures(
        extractor(inputs), inputs.data_root, inputs.out / "figures", progress=False))


def propagation_section(inputs: ReportInputs) -> Section:
    from .propagation import propagation_figures
    if inputs.data_root is None or not inputs.data_root.is_dir():
        raise UserError(f"no data root '{inputs.data_root}': DAVIS overlays skipped")
    davis = find_part(inputs.data_root, "davis")
    if davis is None:
        raise UserError(f"no davis data under '{inputs.data_root}'")
    return figures_section("DAVIS label propagation", lambda: propagation_figures(
        davis, inputs.out / "davis", inputs.out / "figures"))


SECTIONS = (model_section, training_section, tables_section, emergence_section, attention_section,
            embeddings_section, neighbours_section, propagation_section)


def build_section(make: Callable[[ReportInputs], Section], inputs: ReportInputs) -> Section:
    """Run one section maker; a UserError becomes a warning, anything else a failed section (with its cause)."""
    title = make.__name__.removesuffix("_section").replace("_", " ")
    try:
        return make(inputs)
    except UserError as error:
        return Section(title, warnings=[one_line_message(error)])
    except Exception as error:  # a bug must not cost the user the rest of the report
        where = traceback.extract_tb(error.__traceback__)[-1]
        return Section(title, warnings=[f"failed: {type(error).__name__}: {one_line_message(error)} "
                                        f"({Path(where.filename).name}:{where.lineno})"], failed=True)


def render(inputs: ReportInputs, sections: list[Section], seconds: float) -> str:
    """The whole page."""
    warnings = [f"{section.title}: {warning}" for section in sections for warning in section.warnings]
    body = [f"<h1>DINO report: {html.escape(inputs.out.name)}</h1>",
            f"<p>Checkpoint <code>{html.escape(inputs.ckpt)}</code>; built "
            f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} in {seconds:.1f} s.</p>"]
    if warnings:
        items = "".join(f"<li>{html.escape(warning)}</li>" for warning in warnings)
        body.append(f'<div class="warnings"><b>{len(warnings)} warning(s)</b><ul>{items}</ul></div>')
    for section in sections:
        if section.body:
            body.append(f"<h2>{html.escape(section.title)}</h2>{section.body}")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>DINO report: '
            f"{html.escape(inputs.out.name)}</title><style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n")


def load_reported_model(ckpt: str, arch=None, patch=None, seed: int = 0,
                        key: str = "teacher") -> tuple[ModelSource | None, list[str]]:
    """The checkpoint's ``key`` entry (`load_model_source`); for the teacher, the student (with a warning)
    when it has no teacher; None (and why) when the model does not load."""
    try:
        return load_model_source(ckpt, arch, patch, key, seed=seed), []
    except UserError as error:
        if key != "teacher" or "no 'teacher' entry" not in str(error):
            return None, [f"the checkpoint does not load ({one_line_message(error)}): "
                          "figures that need the model are skipped"]
    try:
        subject = load_model_source(ckpt, arch, patch, key="student", seed=seed)
        return subject, ["the checkpoint has no teacher: the figures use its student"]
    except UserError as error:
        return None, [f"the checkpoint has no usable teacher or student ({one_line_message(error)})"]


def build_report(ckpt: str, out=None, data_root="data/suite", images=(), run_dir=None, arch=None, patch=None,
                 device=None, seed: int = 0, key: str = "teacher") -> tuple[Path, list[Section]]:
    """Write ``<out>/report.html``; returns its path and the sections (with their warnings)."""
    started = time.perf_counter()
    subject, load_warnings = load_reported_model(ckpt, arch, patch, seed, key)
    run_dir = Path(run_dir) if run_dir else (Path(ckpt).parent if ckpt != RANDOM else None)
    if subject is None and not (run_dir and (run_dir / "log.jsonl").is_file()):
        raise UserError(f"nothing to report for '{ckpt}': {load_warnings[0]}, and there is no log.jsonl beside it")
    out = Path(out) if out else Path("results") / (subject.run if subject else run_name(ckpt, arch, patch))
    inputs = ReportInputs(ckpt, out, Path(data_root) if data_root else None, run_dir, subject,
                          [Path(image) for image in images], torch.device(device) if device else default_device(), seed)
    sections = [build_section(make, inputs) for make in SECTIONS]
    sections[0].warnings[:0] = load_warnings
    page = render(inputs, sections, time.perf_counter() - started)
    return atomic_write_text(out / "report.html", page), sections


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m analysis.report",
                                     description="HTML report of a run: config, curves, eval-all tables, figures "
                                                 "(--ckpt's folder's log.jsonl gives the curves)")
    add_model_arguments(parser)
    parser.add_argument("--out", default=None, help="folder of eval-all's tables and of the report "
                                                    "(default results/<run>)")
    parser.add_argument("--data-root", default="data/suite", help="evaluation data (default data/suite)")
    parser.add_argument("--images", nargs="*", default=(), help="images or folders for the attention maps "
                                                                "(default: a few of the data root's VOC images)")
    parser.add_argument("--run-dir", default=None, help="folder with log.jsonl and config.json (default: the "
                                                        "checkpoint's)")
    add_device_argument(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.random_like:
        raise UserError("the report shows the random twin beside its model already: pass --ckpt "
                        f"{args.random_like} instead of --random-like")
    if args.ckpt is None and args.arch is None:
        raise UserError("no model given: pass --ckpt <checkpoint> (or --ckpt random with --arch and --patch)")
    path, sections = build_report(args.ckpt or RANDOM, args.out, args.data_root, args.images, args.run_dir,
                                  args.arch, args.patch, args.device, args.seed, args.key)
    for section in sections:
        for warning in section.warnings:
            print(f"warning: {section.title}: {warning}")
    print(f"report: {path}")
    return 1 if any(section.failed for section in sections) else 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
