"""``invdiff bench``: a resumable, distributed benchmark of tasks x samplers x priors x images x seeds.

>>> from invdiff import bench                                         # doctest: +SKIP
>>> result = bench.run("ct-sparse-30,mri-4x", "dps,reddiff", "gaussian-16", n_images=2,
...                    steps=20, out="bench-demo")                      # doctest: +SKIP
>>> result.rows[0]["psnr"], result.files["summary.md"]                 # doctest: +SKIP

* :func:`run` — the grid (see :mod:`invdiff.bench.runner`); every finished cell is a JSON
  line in ``out/results.jsonl`` (:mod:`invdiff.bench.store`); rerunning resumes.
* :func:`report` — ``summary.md``, ``summary.csv``, ``grid.png`` from a results file.
* :class:`SeededSampler` and :func:`deepinv_metrics` — the benchmark's sampler call and
  metrics as deepinv objects, for ``deepinv.test``.
* Seeds, cell ids and the TOML format: :mod:`invdiff.bench.grid`.
"""

from .grid import Cell, SamplerSpec, TaskSpec, load_toml
from .metrics import deepinv_metrics, image_metrics
from .report import report, summarize, write_report
from .runner import BenchResult, SeededSampler, prior_hash, resolve_priors, run
from .store import load_results, merge

__all__ = [
    "run",
    "report",
    "summarize",
    "write_report",
    "load_results",
    "merge",
    "load_toml",
    "BenchResult",
    "SeededSampler",
    "deepinv_metrics",
    "image_metrics",
    "prior_hash",
    "resolve_priors",
    "Cell",
    "TaskSpec",
    "SamplerSpec",
]
