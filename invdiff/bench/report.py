"""Summaries of benchmark results: ``summary.md``, ``summary.csv`` and ``grid.png``.

Statistics are over the successful cells of each (prior, task, sampler): mean and sample
standard deviation (``ddof=1``; 0 for a single cell) over images x seeds. The best sampler
per task (highest mean PSNR; highest SSIM; lowest LPIPS) is in bold. ``grid.png`` shows the
reconstructions kept in ``recon/`` (rows = samplers, columns = tasks, one block of columns
per image; the first row is the ground truth) with the cell's PSNR in the corner.

When one label covers rows with different parameters (a folder reused with other
settings), the labels are told apart by the parameters that differ, e.g. ``dps[steps=50]``.
"""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
from pathlib import Path
from typing import Any, Sequence

from ..files import atomic_file, atomic_write
from ..operators import task_info
from . import store
from .grid import canonical_json

__all__ = ["summarize", "summary_markdown", "summary_csv", "task_table", "write_grid", "write_comparison",
           "write_report", "report", "CSV_COLUMNS"]

CSV_COLUMNS = [
    "prior", "prior_hash", "task", "sampler", "n", "n_failed",
    "psnr_mean", "psnr_std", "ssim_mean", "ssim_std", "lpips_mean", "lpips_std", "z_error_mean", "z_error_std",
    "kernel_error_mean", "kernel_error_std",
    "wall_time_mean", "nfe_mean", "nfe_backward_mean", "peak_memory_max", "best_psnr",
]


def _variants(rows: Sequence[dict], label_key: str, params_key: str, scope: str = "prior") -> dict[int, str]:
    """Display label of each row (by index): the label, plus the differing parameters when
    one label holds several parameter sets."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r.get(scope), r[label_key]), {})[canonical_json(r.get(params_key))] = r.get(params_key) or {}
    names = {}
    for (scope_value, label), variants in groups.items():
        if len(variants) == 1:
            continue
        keys = sorted({k for p in variants.values() for k in p
                       if len({canonical_json(q.get(k)) for q in variants.values()}) > 1})
        for text, p in variants.items():
            differing = ",".join(f"{k}={canonical_json(p.get(k))}" for k in keys)
            names[(scope_value, label, text)] = f"{label}[{differing}]"
    return {i: names.get((r.get(scope), r[label_key], canonical_json(r.get(params_key))), r[label_key])
            for i, r in enumerate(rows)}


def _labelled(rows: Sequence[dict]) -> list[dict]:
    """Rows with display labels ``_prior``, ``_task``, ``_sampler``."""
    rows = list(rows)
    hashes: dict[str, set] = {}
    for r in rows:
        hashes.setdefault(r["prior"], set()).add(r["prior_hash"])
    tasks = _variants(rows, "task", "task_params")
    samplers = _variants(rows, "sampler", "sampler_params")
    out = []
    for i, r in enumerate(rows):
        prior = r["prior"] if len(hashes[r["prior"]]) == 1 else f"{r['prior']}@{r['prior_hash'][:8]}"
        out.append({**r, "_prior": prior, "_task": tasks[i], "_sampler": samplers[i]})
    return out


def _stat(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows: Sequence[dict]) -> list[dict]:
    """One dict per (prior, task, sampler), in first-seen order, with the columns of :data:`CSV_COLUMNS`."""
    groups: dict[tuple, list[dict]] = {}
    for r in _labelled(rows):
        groups.setdefault((r["_prior"], r["_task"], r["_sampler"]), []).append(r)
    stats = []
    for (prior, task, sampler), group in groups.items():
        ok = [r for r in group if r.get("status") == "ok"]
        s = {"prior": prior, "prior_hash": group[0]["prior_hash"], "task": task, "sampler": sampler,
             "n": len(ok), "n_failed": sum(r.get("status") not in ("ok", "incompatible") for r in group)}
        for key in ("psnr", "ssim", "lpips", "z_error", "kernel_error"):  # z_error: volumes; kernel_error: blind
            values = [r.get(key) for r in ok]
            s[f"{key}_mean"], s[f"{key}_std"] = _stat(values) if all(v is not None for v in values) else (None, None)
        s["wall_time_mean"] = _stat([r.get("wall_time") for r in ok])[0]
        s["nfe_mean"] = _stat([r.get("nfe") for r in ok])[0]
        s["nfe_backward_mean"] = _stat([r.get("nfe_backward") for r in ok])[0]
        mem = [r["peak_memory"] for r in ok if r.get("peak_memory") is not None]
        s["peak_memory_max"] = max(mem) if mem else None
        stats.append(s)
    for s in stats:  # best PSNR per (prior, task)
        peers = [t["psnr_mean"] for t in stats if (t["prior"], t["task"]) == (s["prior"], s["task"])
                 and t["psnr_mean"] is not None]
        s["best_psnr"] = s["psnr_mean"] is not None and s["psnr_mean"] == max(peers)
    return stats


def summary_csv(stats: Sequence[dict]) -> str:
    """The statistics as CSV text (columns :data:`CSV_COLUMNS`; empty fields for missing values)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for s in stats:
        writer.writerow({k: ("" if s.get(k) is None else s[k]) for k in CSV_COLUMNS})
    return buf.getvalue()


def _fmt(mean: float | None, std: float | None, digits: int, bold: bool) -> str:
    if mean is None:
        return "–"
    text = f"{mean:.{digits}f} ± {std:.{digits}f}"
    return f"**{text}**" if bold else text


def _is_best(stats: list[dict], s: dict, key: str, lower: bool = False) -> bool:
    peers = [t[key] for t in stats if t["prior"] == s["prior"] and t["task"] == s["task"] and t[key] is not None]
    if s[key] is None or not peers:
        return False
    return s[key] == (min(peers) if lower else max(peers))


def summary_markdown(stats: Sequence[dict], rows: Sequence[dict]) -> str:
    """The summary as markdown: per prior, a table of PSNR / SSIM (rows = samplers, columns =
    tasks, best per task in bold), LPIPS when measured, then seconds / NFE per cell."""
    stats = list(stats)
    lines = ["# invdiff bench summary", ""]
    if rows:
        v = rows[0].get("versions", {})
        images = sorted({r["image"] for r in rows})
        seeds = sorted({r["seed"] for r in rows})
        devices = sorted({str(r.get("device_name") or r.get("device")) for r in rows})
        lines.append(f"{len(rows)} cells: {len(images)} images x {len(seeds)} seeds per task and sampler; "
                     f"device {', '.join(devices)}; invdiff {v.get('invdiff')}, torch {v.get('torch')}, "
                     f"deepinv {v.get('deepinv')}.")
        lines.append("")
    for prior in dict.fromkeys(s["prior"] for s in stats):
        mine = [s for s in stats if s["prior"] == prior]
        tasks = list(dict.fromkeys(s["task"] for s in mine))
        samplers = list(dict.fromkeys(s["sampler"] for s in mine))
        cell = {(s["task"], s["sampler"]): s for s in mine}
        lines += [f"## prior `{prior}` (sha256 {mine[0]['prior_hash'][:12]})", ""]
        lines.append("PSNR (dB) / SSIM, mean ± std over images x seeds; best per task in bold. "
                     "MRI tasks: over the ground truth's range (fastMRI).")
        lines.append("")
        header = "| sampler | " + " | ".join(tasks) + " |"
        rule = "|---|" + "---|" * len(tasks)
        lines += [header, rule]
        for name in samplers:
            parts = []
            for task in tasks:
                s = cell.get((task, name))
                if s is None:
                    parts.append("")
                    continue
                text = (_fmt(s["psnr_mean"], s["psnr_std"], 2, _is_best(mine, s, "psnr_mean")) + " / "
                        + _fmt(s["ssim_mean"], s["ssim_std"], 3, _is_best(mine, s, "ssim_mean")))
                if s["n"] == 0:
                    text = f"failed ({s['n_failed']})"
                elif s["n_failed"]:
                    text += f" ({s['n_failed']} failed)"
                parts.append(text)
            lines.append(f"| {name} | " + " | ".join(parts) + " |")
        lines.append("")
        for key, title in (("lpips", "LPIPS, mean ± std (lower is better):"),
                           ("z_error", "z-gradient error ‖Dz x̂ − Dz x‖ / ‖Dz x‖ (volumes; lower is better):"),
                           ("kernel_error", "kernel error ‖k̂ − k‖ / ‖k‖ of the estimated blur kernel (blind tasks; "
                                            "lower is better):")):
            if not any(s.get(f"{key}_mean") is not None for s in mine):
                continue
            lines += [title, "", header, rule]
            for name in samplers:
                parts = [_fmt(cell[t, name][f"{key}_mean"], cell[t, name][f"{key}_std"], 3,
                              _is_best(mine, cell[t, name], f"{key}_mean", lower=True)) if (t, name) in cell else ""
                         for t in tasks]
                lines.append(f"| {name} | " + " | ".join(parts) + " |")
            lines.append("")
        lines += ["Sampler wall time (s) / NFE per cell:", "", header, rule]
        for name in samplers:
            parts = []
            for task in tasks:
                s = cell.get((task, name))
                ok = s is not None and s["wall_time_mean"] is not None
                parts.append(f"{s['wall_time_mean']:.2f} / {s['nfe_mean']:.0f}" if ok else "")
            lines.append(f"| {name} | " + " | ".join(parts) + " |")
        lines.append("")
    notes = sorted({r["notes"] for r in rows if r.get("notes")})
    if notes:
        lines += ["Notes: " + "; ".join(notes), ""]
    incompatible = {(r["sampler"], r["task"]): r["error"] for r in rows if r.get("status") == "incompatible"}
    if incompatible:
        lines.append("Not applicable (the sampler cannot use the operator):")
        lines.append("")
        lines += [f"- {sampler} / {task}: {error}" for (sampler, task), error in incompatible.items()]
        lines.append("")
    failed = [r for r in rows if r.get("status") not in ("ok", "incompatible")]
    if failed:
        lines.append(f"Failed cells ({len(failed)}):")
        lines.append("")
        for r in failed[:20]:
            lines.append(f"- {r['prior']} / {r['task']} / {r['sampler']} / {r['image']} / seed {r['seed']}: "
                         f"{r['error']}")
        if len(failed) > 20:
            lines.append(f"- ... and {len(failed) - 20} more (see the results file)")
        lines.append("")
    return "\n".join(lines)


def task_table(stats: Sequence[dict], samplers: Sequence[str] | None = None,
               labels: dict[str, str] | None = None, missing: str = "n/a") -> str:
    """A markdown pivot of :func:`summarize`'s statistics: one row per (task, prior), one
    column per sampler, each cell ``mean PSNR / mean SSIM`` (``missing`` where a sampler has
    no successful cell).

    :param samplers: the columns, in order (default: every sampler, first-seen order).
    :param labels: column headers instead of sampler labels (``{"baseline": "baseline (A_dagger)"}``).
    """
    stats = list(stats)
    columns = list(samplers) if samplers is not None else list(dict.fromkeys(s["sampler"] for s in stats))
    labels = labels or {}
    cell = {(s["task"], s["prior"], s["sampler"]): s for s in stats}
    lines = ["| task | prior | " + " | ".join(labels.get(c, c) for c in columns) + " |",
             "|" + "---|" * (len(columns) + 2)]
    for task, prior in dict.fromkeys((s["task"], s["prior"]) for s in stats):
        parts = []
        for c in columns:
            s = cell.get((task, prior, c))
            if s is None or s["psnr_mean"] is None:
                parts.append(missing)
            else:
                ssim = "n/a" if s["ssim_mean"] is None else f"{s['ssim_mean']:.3f}"
                parts.append(f"{s['psnr_mean']:.2f} / {ssim}")
        lines.append(f"| {task} | {prior} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def write_comparison(rows: Sequence[dict], folder: str | os.PathLike, path: str | os.PathLike,
                     maps: str | None = None, samplers: Sequence[str] | None = None) -> Path | None:
    """Draw a side-by-side figure from the reconstructions kept in ``folder/recon``: one row
    per (prior, task), for its first image at the smallest seed; columns: the ground truth,
    each sampler's reconstruction with the cell's PSNR, then ``|x_hat - x|`` of the sampler
    ``maps`` and, when its cell kept one (``samples > 1``), the per-pixel std of its samples.
    ``None`` if no reconstruction was kept.

    :param maps: the sampler whose error and std maps are shown (default: the first column).
    :param samplers: the columns, in order (default: every sampler, first-seen order).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder, path = Path(folder), Path(path)
    rows = [r for r in _labelled(rows) if r.get("recon") and (folder / r["recon"]).is_file()]
    if not rows:
        return None
    columns = list(samplers) if samplers is not None else list(dict.fromkeys(r["_sampler"] for r in rows))
    maps = maps if maps is not None else columns[0]
    panels = []
    for prior, task in dict.fromkeys((r["_prior"], r["_task"]) for r in rows):
        mine = [r for r in rows if (r["_prior"], r["_task"]) == (prior, task)]
        seed = min(r["seed"] for r in mine)
        first = min(r["image_index"] for r in mine if r["seed"] == seed)
        cell = {r["_sampler"]: r for r in mine if r["seed"] == seed and r["image_index"] == first}
        panels.append((task, {name: (cell[name], _load_recon(folder, cell[name]["recon"]))
                              for name in columns if name in cell}))
    titles = ["ground truth", *columns, f"|{maps} - truth|", f"{maps} std"]
    fig, axes = plt.subplots(len(panels), len(titles), figsize=(1.9 * len(titles), 2.0 * len(panels)),
                             squeeze=False)
    for i, (task, recons) in enumerate(panels):
        some = next(iter(recons.values()))
        truth = some[1]["x"]
        peak = float(_show(truth).max()) if task_info(some[0]["task_name"]).metric_range == "data" else 1.0
        err = std = None
        if maps in recons:
            data = recons[maps][1]
            err = (data["x_hat"].clamp(0, 1) - data["x"]).abs()
            std = data.get("std")
        vmax_map = max([float(_show(m).max()) for m in (err, std) if m is not None] + [1e-6])
        images = [(truth, None), *[(recons[n][1]["x_hat"] if n in recons else None, recons.get(n, (None,))[0])
                                   for n in columns], (err, None), (std, None)]
        for c, (img, r) in enumerate(images):
            ax = axes[i, c]
            is_map = c > len(columns)
            if img is not None:
                ax.imshow(_show(img), cmap="magma" if is_map else "gray", vmin=0, vmax=vmax_map if is_map else peak)
            if r is not None:
                ax.text(1, 1, f"{r['psnr']:.1f} dB", color="yellow", fontsize=7, va="top")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[c], fontsize=8)
        axes[i, 0].set_ylabel(task, fontsize=8)
    fig.tight_layout()
    try:
        with atomic_file(path, overwrite=True) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _load_recon(folder: Path, rel: str | None):
    if not rel:
        return None
    path = folder / rel
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    return load_file(str(path))


def _show(img) -> Any:
    """``(1, C, H, W)`` -> a 2-D array to display (magnitude for complex, grey for 1 channel, RGB for 3);
    a volume ``(1, C, D, H, W)`` shows its central axial slice."""
    x = img[0].float()
    if x.ndim == 4:
        x = x[:, x.shape[1] // 2]
    if x.shape[0] == 2:
        return x.norm(dim=0).numpy()
    if x.shape[0] == 3:
        return x.clamp(0, 1).permute(1, 2, 0).numpy()
    return x[0].numpy()


def write_grid(rows: Sequence[dict], folder: Path, path: Path, figure_images: int | None = None) -> Path | None:
    """Draw ``grid.png`` from the reconstructions kept in ``folder/recon``; ``None`` if there are none.

    Uses the first prior and the smallest seed that have reconstructions, and up to
    ``figure_images`` images (all that have reconstructions when ``None``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in _labelled(rows) if r.get("recon") and (folder / r["recon"]).is_file()]
    if not rows:
        return None
    prior = rows[0]["_prior"]
    seed = min(r["seed"] for r in rows if r["_prior"] == prior)
    rows = [r for r in rows if r["_prior"] == prior and r["seed"] == seed]
    images = sorted(dict.fromkeys(r["image"] for r in rows), key=lambda i: next(r["image_index"] for r in rows
                                                                               if r["image"] == i))
    images = images[:figure_images] if figure_images else images
    tasks = list(dict.fromkeys(r["_task"] for r in rows))
    samplers = list(dict.fromkeys(r["_sampler"] for r in rows))
    cell = {(r["image"], r["_task"], r["_sampler"]): r for r in rows}
    columns = [(im, t) for im in images for t in tasks]
    fig, axes = plt.subplots(1 + len(samplers), len(columns), figsize=(1.8 * len(columns), 1.8 * (1 + len(samplers))),
                             squeeze=False)
    for c, (im, task) in enumerate(columns):
        truth, peak, kernel = None, 1.0, None
        for r_i, name in enumerate(samplers, start=1):
            ax = axes[r_i, c]
            r = cell.get((im, task, name))
            data = _load_recon(folder, r["recon"]) if r else None
            if data is not None:
                truth = data["x"] if truth is None else truth
                data_range = task_info(r["task_name"]).metric_range == "data"
                peak = float(_show(data["x"]).max()) if data_range else 1.0  # as the PSNR
                ax.imshow(_show(data["x_hat"]), cmap="gray", vmin=0, vmax=peak)
                ax.text(1, 1, f"{r['psnr']:.1f} dB", color="yellow", fontsize=7, va="top")
                if "kernel_hat" in data:  # a blind task: the estimated kernel, inset
                    _kernel_inset(ax, data["kernel_hat"])
                    kernel = data.get("kernel")
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
        ax = axes[0, c]
        if truth is not None:
            ax.imshow(_show(truth), cmap="gray", vmin=0, vmax=peak)
        if kernel is not None:  # the true kernel of a blind task
            _kernel_inset(ax, kernel)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(task if len(images) == 1 else f"{task}\n{im}", fontsize=7)
        if c == 0:
            ax.set_ylabel("ground truth", fontsize=8)
    fig.suptitle(f"prior {prior}, seed {seed}", fontsize=8)
    fig.tight_layout()
    try:
        with atomic_file(path, overwrite=True) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path


def _kernel_inset(ax, kernel) -> None:
    """A blur kernel, scaled to its maximum, in the top-right corner of ``ax``."""
    k = kernel.reshape(-1, *kernel.shape[-2:])[0].float()
    inset = ax.inset_axes([0.64, 0.64, 0.34, 0.34])
    inset.imshow((k / k.max().clamp_min(1e-12)).numpy(), cmap="magma", vmin=0, vmax=1)
    inset.set_xticks([]), inset.set_yticks([])


def write_report(rows: Sequence[dict], out: str | os.PathLike, folder: str | os.PathLike | None = None,
                 figure_images: int | None = None) -> dict[str, Path]:
    """Write ``summary.md``, ``summary.csv`` and (when reconstructions were kept) ``grid.png``
    to ``out``; reconstructions are read from ``folder/recon`` (default ``out``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    folder = Path(folder) if folder is not None else out
    stats = summarize(rows)
    atomic_write(out / "summary.md", summary_markdown(stats, rows))
    atomic_write(out / "summary.csv", summary_csv(stats))
    paths = {"summary.md": out / "summary.md", "summary.csv": out / "summary.csv"}
    grid = write_grid(rows, folder, out / "grid.png", figure_images)
    if grid is not None:
        paths["grid.png"] = grid
    return paths


def report(results: str | os.PathLike, out: str | os.PathLike | None = None,
           figure_images: int | None = None) -> dict[str, Path]:
    """Rebuild the summary and figure from a results file (or a benchmark folder).

    :param results: ``results.jsonl`` or the folder holding it.
    :param out: where to write (default: the results file's folder).
    """
    results = Path(results)
    rows = store.load_results(results)
    if not rows:
        raise ValueError(f"{results}: no benchmark rows found")
    folder = results if results.is_dir() else results.parent
    return write_report(rows, out if out is not None else folder, folder, figure_images)
