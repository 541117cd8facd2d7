"""Neighbour figures: retrieval top-k on revisited Oxford / Paris with easy/hard/junk marked, and Copydays hits.

``retrieval_<dataset>.png`` (`retrieval_figures`): one row per query (evenly
spaced over those with a positive): the whole query image (blue frame, its
``bbx`` in yellow), then its top-k database images ranked exactly as
`evaluate.retrieval` ranks them ([CLS] at the evaluator's thumbnail size and
scales, cosine, `rank_database`), each framed by its status under the
revisitop protocol (`retrieval_statuses`, from `evaluate.metrics.protocol_sets`):

    protocol  positives                         ignored (grey "junk")
    easy      easy (green)                      hard + junk
    medium    easy (green) + hard (orange)      junk
    hard      hard (orange)                     easy + junk

any other image is a "negative" (red). DINO reports Medium and Hard.

``copy_detection.png`` (`copy_detection_figures`): one row per Copydays
"strong" query (evenly spaced), then its top-k of the database (originals,
then distractors when present) by the evaluator's descriptor (S x S resize,
[CLS] ++ GeM_4(patch tokens), PCA-whitened when a whitening set is present,
cosine: `evaluate.copy_detection`): the true original green ("positive"),
every other image red. Labels: rank, mark, cosine; under each query the
rank of its first positive in the whole database.

Settings left as None are those ``make eval-all`` plans (`evaluate.eval_plan`).
``model``: a backbone, or a `FeatureExtractor` (the CLI's reads the cache
``make eval-all`` wrote, ``results/<run>/features``). Tiles: TILE_SIDE px.

    python -m analysis.neighbours --ckpt runs/demo/checkpoint.pth --data-root data/suite  # -> results/demo/figures
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
import torch.nn.functional as F

from common.errors import UserError, one_line_message, run_cli
from data.copydays import STRONG_BLOCK, Copydays
from data.imagefolder import load_rgb
from data.revisitop import RevisitopDataset
from evaluate.copy_detection import copy_detection_descriptors
from evaluate.eval_plan import EvalOptions, ModelInfo, plan, plan_copy_detection, plan_retrieval, read_suite
from evaluate.features import FeatureExtractor, as_extractor
from evaluate.metrics import RETRIEVAL_PROTOCOLS, protocol_sets
from evaluate.model_source import add_evaluator_arguments, feature_extractor, load_model
from evaluate.retrieval import dataset_features, rank_database
from pretrain.backbones import describe

from .figures import FigureFile, FigureSet, fit_square, print_outcome, save_figure, tile_grid, to_uint8, with_border

TILE_SIDE = 128
BOX_COLOUR = (255, 215, 0)


@dataclass
class NeighbourRow:
    """One query's row: its index, its top-k database indices (best first), their cosines and marks, and the
    1-based rank of its best-ranked positive in the whole database (None when it has none)."""
    query: int
    neighbours: list[int]
    similarities: list[float]
    marks: list[str]
    first_positive: int | None


def neighbour_row(query: int, ranking: np.ndarray, similarity: np.ndarray, k: int, positives, mark) -> NeighbourRow:
    """The row of one query from its whole ranking (n_db,) and cosines (n_db,); ``mark(top-k indices)`` -> marks."""
    top = ranking[:k].tolist()
    hits = np.flatnonzero(np.isin(ranking, np.asarray(list(positives), dtype=np.int64)))
    return NeighbourRow(query, top, similarity[top].tolist(), mark(top), int(hits[0]) + 1 if hits.size else None)


def planning_info(model: torch.nn.Module) -> ModelInfo:
    """What `evaluate.eval_plan` needs to choose the settings: arch, patch, width."""
    spec = describe(model)
    return ModelInfo(spec["arch"], spec["patch"], getattr(model, "embed_dim", 0))


def planned_settings(planner, folder: Path, model: torch.nn.Module, **match) -> dict:
    """The settings ``make eval-all`` gives the data part ``folder`` (the evaluation whose settings hold ``match``)."""
    evaluations = planner(folder, read_suite(folder), planning_info(model), EvalOptions())
    return next(e.settings for e in evaluations if all(e.settings[key] == value for key, value in match.items()))


def evenly_spaced(candidates: list[int], count: int) -> list[int]:
    """``count`` items of ``candidates`` spread from the first to the last (all of them when there are fewer)."""
    if count < 1:
        raise UserError(f"asked for {count} queries: draw at least 1")
    if count >= len(candidates):
        return list(candidates)
    return [candidates[round(position)] for position in np.linspace(0, len(candidates) - 1, count)]


def cosines(database_features: torch.Tensor, query_features: torch.Tensor) -> np.ndarray:
    """(n_db, n_q) cosine similarities, in float64 as `rank_database` computes them."""
    return (F.normalize(database_features.double(), dim=1) @ F.normalize(query_features.double(), dim=1).T).numpy()


# ----------------------------------------------------------------- retrieval

def retrieval_statuses(query_gnd, database_indices, protocol: str = "medium") -> list[str]:
    """The mark of each database image for one query under ``protocol``: "easy" or "hard" for a positive
    (by the gnd list it is in), "junk" for an ignored image, "negative" otherwise.

    ``query_gnd``: a gnd-pickle dict or a `data.revisitop.QueryGroundTruth`.
    """
    positives, ignored = (set(indices.tolist()) for indices in protocol_sets(query_gnd, protocol))
    easy = set(protocol_sets(query_gnd, "easy")[0].tolist())  # the Easy protocol's positives: the easy list
    return [("easy" if index in easy else "hard") if index in positives else
            ("junk" if index in ignored else "negative") for index in database_indices]


def retrieval_rows(extractor: FeatureExtractor, dataset: RevisitopDataset, queries, k: int, protocol: str,
                   imsize: int, multiscale: bool) -> list[NeighbourRow]:
    """Top-k rows of the chosen queries: ``queries`` = a count (evenly spaced over the queries with a
    positive under ``protocol``) or a list of query indices."""
    if protocol not in RETRIEVAL_PROTOCOLS:
        raise UserError(f"unknown retrieval protocol '{protocol}': choose among {', '.join(RETRIEVAL_PROTOCOLS)}")
    gnd = dataset.ground_truth.queries
    if isinstance(queries, int):
        queries = evenly_spaced([q for q in range(len(gnd)) if protocol_sets(gnd[q], protocol)[0].size], queries)
    database_features, query_features = dataset_features(extractor, dataset, imsize, multiscale)
    ranks = rank_database(database_features, query_features)  # (n_db, n_q): the evaluator's ranking
    similarity = cosines(database_features, query_features)
    return [neighbour_row(query, ranks[:, query], similarity[:, query], k, protocol_sets(gnd[query], protocol)[0],
                          lambda top: retrieval_statuses(gnd[query], top, protocol)) for query in queries]


def framed_tile(image: PIL.Image.Image, mark: str) -> np.ndarray:
    """``image`` fitted into a TILE_SIDE square and framed in the colour of ``mark``."""
    return with_border(fit_square(to_uint8(image), TILE_SIDE), mark)


def boxed_query_tile(image: PIL.Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    """The query tile with its (left, top, right, bottom) box (right/bottom exclusive), mapped into the tile the
    way `fit_square` places the image, drawn 2 px wide in BOX_COLOUR."""
    scale = TILE_SIDE / max(image.size)
    offsets = [(TILE_SIDE - max(1, round(side * scale))) // 2 for side in image.size]
    corners = [offsets[i % 2] + value * scale for i, value in enumerate(box)]
    tile = PIL.Image.fromarray(fit_square(to_uint8(image), TILE_SIDE))
    PIL.ImageDraw.Draw(tile).rectangle((corners[0], corners[1], corners[2] - 1, corners[3] - 1), outline=BOX_COLOUR,
                                       width=2)
    return with_border(np.asarray(tile), "query")


def query_label(title: str, row: NeighbourRow, positive: str = "first positive") -> str:
    """Two lines: the query's title, then the rank of its first positive."""
    return f"{title}\n{positive}: " + (f"#{row.first_positive}" if row.first_positive else "none")


def neighbour_cells(row: NeighbourRow, load_database_image) -> list[tuple[np.ndarray, str]]:
    """The (tile, "rank. mark cosine") cells of a row's neighbours."""
    return [(framed_tile(load_database_image(index), mark), f"{rank}. {mark} {similarity:.4f}")
            for rank, (index, similarity, mark) in enumerate(zip(row.neighbours, row.similarities, row.marks), 1)]


def retrieval_cells(dataset: RevisitopDataset, rows: list[NeighbourRow]) -> list[list[tuple[np.ndarray, str]]]:
    """One list of cells per row: the boxed query, then its neighbours."""
    grid = []
    for row in rows:
        image = dataset.load_query_image(row.query, crop=False)
        query = (boxed_query_tile(image, dataset.query_crop_box(row.query, image.size)),
                 query_label(f"query {dataset.ground_truth.qimlist[row.query]}", row))
        grid.append([query] + neighbour_cells(row, dataset.load_database_image))
    return grid


def retrieval_figures(model, dataset_dir, out_dir, queries=3, k: int = 8, protocol: str = "medium",
                      imsize: int | None = None, multiscale: bool | None = None, device=None,
                      progress: bool = True) -> FigureSet:
    """Draw ``retrieval_<name>.png`` for the revisitop dataset folder ``dataset_dir`` (gnd_<name>.pkl + jpg/).

    ``imsize`` / ``multiscale`` default to what ``make eval-all`` uses for the dataset.
    """
    dataset_dir = Path(dataset_dir)
    dataset = RevisitopDataset(dataset_dir.parent, dataset_dir.name)
    extractor = as_extractor(model, device, progress=progress)
    if imsize is None or multiscale is None:
        planned = planned_settings(plan_retrieval, dataset_dir.parent, extractor.model, dataset=dataset.dataset)
        imsize, multiscale = imsize or planned["imsize"], planned["multiscale"] if multiscale is None else multiscale
    rows = retrieval_rows(extractor, dataset, queries, k, protocol, imsize, multiscale)
    if not rows:
        return FigureSet([], [f"{dataset.dataset}: no query has a positive under the {protocol} protocol"])
    name = dataset.dataset
    fig = tile_grid(retrieval_cells(dataset, rows),
                    title=f"{name}: top-{k} by [CLS] cosine, {protocol.capitalize()} protocol")
    path = save_figure(fig, Path(out_dir) / f"retrieval_{name}.png")
    caption = (f"{len(rows)} of {len(dataset.query_paths)} queries (blue, box in yellow) and their {k} nearest of "
               f"{len(dataset.database_paths)} database images ([CLS], thumbnail {imsize}"
               f"{', multiscale' if multiscale else ''}, cosine). {protocol.capitalize()} protocol: "
               + {"easy": "easy positives green; hard and junk ignored (grey)",
                  "medium": "easy positives green, hard positives orange; junk ignored (grey)",
                  "hard": "hard positives orange; easy and junk ignored (grey)"}[protocol]
               + "; negatives red.")
    return FigureSet([FigureFile(path, f"Retrieval on {name}", caption)], [])


# ------------------------------------------------------------ copy detection

def copy_detection_rows(extractor: FeatureExtractor, copydays: Copydays, query_indices: list[int], k: int,
                        imsize: int) -> list[NeighbourRow]:
    """Top-k rows of the strong-block queries ``query_indices``, by the evaluator's (whitened) descriptors.

    The database and whitening features use the evaluator's split names, so its feature cache is reused.
    """
    strong = copydays.block(STRONG_BLOCK)
    database, queries = copy_detection_descriptors(extractor, copydays, imsize,
                                                   [strong.paths[i] for i in query_indices], "copydays-strong-figure")
    ranks, similarity = rank_database(database, queries), cosines(database, queries)  # ranks: (n_db, n_q)
    return [neighbour_row(query, ranks[:, column], similarity[:, column], k, strong.positives[query],
                          lambda top: ["positive" if index in strong.positives[query] else "negative" for index in top])
            for column, query in enumerate(query_indices)]


def copy_detection_cells(copydays: Copydays, rows: list[NeighbourRow]) -> list[list[tuple[np.ndarray, str]]]:
    """One list of cells per row: the strong copy, then its neighbours."""
    strong = copydays.block(STRONG_BLOCK)
    return [[(framed_tile(load_rgb(strong.paths[row.query]), "query"),
              query_label(f"strong {Path(strong.paths[row.query]).name}", row, "original"))]
            + neighbour_cells(row, lambda index: load_rgb(copydays.database_paths[index])) for row in rows]


def copy_detection_figures(model, copydays_root, out_dir, queries: int = 4, k: int = 5, imsize: int | None = None,
                           distractors=None, whitening=None, device=None, progress: bool = True) -> FigureSet:
    """Draw ``copy_detection.png`` for the Copydays tree ``copydays_root``.

    ``imsize``, ``distractors`` and ``whitening`` left as None are what ``make eval-all`` uses (the
    ``distractors/`` and ``whitening/`` folders inside or beside the tree, when present).
    """
    extractor = as_extractor(model, device, progress=progress)
    root = Path(copydays_root)
    if not root.is_dir():
        raise UserError(f"Copydays folder '{root}' does not exist: pass the folder holding original/ and strong/")
    planned = planned_settings(plan_copy_detection, root, extractor.model)
    imsize = imsize or planned["imsize"]
    copydays = Copydays(root, distractors or planned["distractors"], whitening or planned["whitening"])
    strong = copydays.block(STRONG_BLOCK)
    rows = copy_detection_rows(extractor, copydays, evenly_spaced(list(range(len(strong.paths))), queries), k, imsize)
    fig = tile_grid(copy_detection_cells(copydays, rows), title=f"Copydays strong: top-{k} by [CLS] + GeM descriptor")
    path = save_figure(fig, Path(out_dir) / "copy_detection.png")
    database = f"{len(copydays.original_paths)} originals + {len(copydays.distractor_paths)} distractors"
    whitened = f"PCA-whitened on {len(copydays.whitening_paths)} images" if copydays.whitening_paths else "not whitened"
    caption = (f"{len(rows)} of {len(strong.paths)} strong copies (blue) and their {k} nearest of {database} "
               f"([CLS] ++ GeM-4 of the patch tokens at {imsize}x{imsize}, {whitened}, cosine); "
               "the true original green, other images red.")
    return FigureSet([FigureFile(path, "Copy detection on Copydays (strong)", caption)], [])


# --------------------------------------------------------------- everything

def neighbour_figures(model, data_root, out_dir, queries: int = 3, k: int = 8, protocol: str = "medium",
                      copy_queries: int = 4, copy_k: int = 5, device=None, progress: bool = True) -> FigureSet:
    """Retrieval figures for every revisitop dataset and the Copydays figure, for whichever exist under
    ``data_root`` (the layout ``make eval-all`` reads), with its settings; one problem line per failed part."""
    extractor = as_extractor(model, device, progress=progress)
    evaluations, failures = plan(data_root, planning_info(extractor.model))
    wanted = [evaluation for evaluation in evaluations if evaluation.kind in ("retrieval", "copy_detection")]
    problems = [f"{part}: {message}" for part, message in failures if part in ("retrieval", "copydays")]
    if not wanted and not problems:
        raise UserError(f"no retrieval or Copydays data under '{data_root}': expected retrieval/<name>/"
                        "gnd_<name>.pkl or copydays/original/ (make data writes data/suite)")
    figures = []
    for evaluation in wanted:
        settings = evaluation.settings
        try:
            if evaluation.kind == "retrieval":
                made = retrieval_figures(extractor, Path(evaluation.data) / settings["dataset"], out_dir, queries,
                                         k, protocol, settings["imsize"], settings["multiscale"])
            else:
                made = copy_detection_figures(extractor, evaluation.data, out_dir, copy_queries, copy_k,
                                              settings["imsize"], settings["distractors"], settings["whitening"])
        except UserError as error:
            problems.append(f"{evaluation.name}: {one_line_message(error)}")
            continue
        figures += made.figures
        problems += made.problems
    return FigureSet(figures, problems)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.neighbours",
                                     description="retrieval top-k grids (easy/hard/junk marked) and Copydays hits")
    parser.add_argument("--data-root", default="data/suite",
                        help="folder holding retrieval/<name>/gnd_<name>.pkl and/or copydays/ (default data/suite)")
    parser.add_argument("--out", default=None,
                        help="figure folder (default results/<run>/figures; figures-random-init with --random-like)")
    parser.add_argument("--queries", type=int, default=3, help="retrieval queries per dataset")
    parser.add_argument("--k", type=int, default=8, help="retrieval neighbours per query")
    parser.add_argument("--protocol", choices=RETRIEVAL_PROTOCOLS, default="medium")
    parser.add_argument("--copy-queries", type=int, default=4, help="Copydays strong queries")
    parser.add_argument("--copy-k", type=int, default=5, help="Copydays neighbours per query")
    add_evaluator_arguments(parser, batch_size=16)
    parser.set_defaults(num_workers=0)  # a few hundred small images: worker start-up costs more than it saves
    args = parser.parse_args(argv)
    if min(args.queries, args.k, args.copy_queries, args.copy_k) < 1:
        raise UserError("--queries, --k, --copy-queries and --copy-k must be at least 1")
    source = load_model(args)
    extractor = feature_extractor(source, args)
    out = args.out or source.results_dir("figures")
    result = neighbour_figures(extractor, args.data_root, out, args.queries, args.k, args.protocol,
                               args.copy_queries, args.copy_k)
    return print_outcome(result)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
