"""Figures and the HTML report: what a DINO model learned, seen rather than read.

attention.py   per-head [CLS] attention grids and their 60%-mass masks
embeddings.py  t-SNE of features coloured by class, k-NN neighbour grids
neighbours.py  retrieval top-k (easy/hard/junk marked), copy-detection hits
propagation.py DAVIS label-propagation overlays
curves.py      training curves and collapse monitors from a run's log.jsonl
emergence.py   the models the report compares (random twin, model, student) and their diagnosis table
report.py      ``make report``: results/<run>/report.html
figures.py     shared drawing helpers (tiles, borders, overlays, atomic PNGs)
"""
