"""What the notebooks need when a person runs them in JupyterLab: a run directory of their own, figures shown inline,
and one notebook's choices reaching the next.

* ``run_dirs``: a notebook's results and figures folders. The committed notebooks point at ``runs/walkthrough/``
  (gitignored); a folder there is filled from the committed ``results/`` and ``figures/`` on first use, so that
  every step is a cache hit, and the committed files are only ever read. ``./reproduce.sh`` passes its own
  ``runs/<run>/`` folders, which are never filled this way (a reproduction computes everything).
* ``show_figures``: the PNGs a plotting function saved, displayed in the notebook (embedded, so they show in any
  viewer and whatever the server's root is).
* ``notebook02_allocations``: the bit maps notebook 02 wrote last into a results folder (its targets, per-layer bit
  ranges, sources, ``negative_traces`` and quantizer are read from its files), so that an edit of 02's parameters
  reaches Table 1 (03) and Figure 2 (04) without being repeated there.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from detrq.artifact.pipeline import SEED_STABILITY_FILE, bitmap_path, read_allocations
from detrq.io.errors import DetrqError
from detrq.io.layout import fill_missing, results_file
from detrq.io.paths import PROJECT_ROOT, resolve_path
from detrq.io.results import read_json
from detrq.quant.allocate import paper_bits_range

WALKTHROUGH_DIR = PROJECT_ROOT / "runs" / "walkthrough"
COMMITTED_RESULTS = PROJECT_ROOT / "results"
COMMITTED_FIGURES = PROJECT_ROOT / "figures"
SEEDED_MARKER = ".seeded"  # in a filled folder: filling is done (a folder filled halfway gets the rest next time)
MEASURED = "measured"  # Measured Sen's source name (as table1.MEASURED)


class RunDirs(NamedTuple):
    results: Path
    figures: Path | None


def run_dirs(results_dir: str | os.PathLike, figures_dir: str | os.PathLike | None = None) -> RunDirs:
    """``results_dir`` and ``figures_dir`` resolved from the repository root; a folder inside ``runs/walkthrough/``
    is first filled from the committed ``results/`` (or ``figures/``) if it has not been yet (``seed_folder``).
    Delete ``runs/walkthrough/`` to start the walkthrough over from the committed files."""
    results = resolve_path(results_dir)
    figures = None if figures_dir is None else resolve_path(figures_dir)
    for folder, committed in ((results, COMMITTED_RESULTS), (figures, COMMITTED_FIGURES)):
        if folder is not None and folder.resolve().is_relative_to(WALKTHROUGH_DIR.resolve()):
            seed_folder(folder, committed)
    return RunDirs(results, figures)


def seed_folder(folder: str | os.PathLike, source: str | os.PathLike) -> list[str]:
    """``io.layout.fill_missing(folder, source)`` unless ``folder`` was filled before (a marker file says so);
    returns the names copied. Nothing in ``folder`` is overwritten and ``source`` is only read."""
    folder, source = Path(folder), Path(source)
    if folder.resolve() == source.resolve():
        raise DetrqError(f"cannot fill {folder} from itself")
    if (folder / SEEDED_MARKER).is_file():
        return []
    copied = [src.name for src in fill_missing(folder, source)]
    (folder / SEEDED_MARKER).write_text(f"filled from {source.name}/ on {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    return copied


def png_for_display(path: str | os.PathLike, max_width: int = 1600) -> bytes:
    """The PNG at ``path`` as a notebook embeds it: scaled down to ``max_width`` pixels if wider, in 256 colours
    (a third of the bytes, and no visible difference on a plot). The saved file stays as it is."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.width > max_width:
            im = im.resize((max_width, round(im.height * max_width / im.width)), Image.Resampling.LANCZOS)
        small = im.convert("RGB").quantize(256)
    buf = io.BytesIO()
    small.save(buf, format="png", optimize=True)
    return buf.getvalue()


def show_figures(paths: Iterable[str | os.PathLike], *, max_width: int = 1600) -> None:
    """Display each PNG of ``paths`` (a plotting function's returned files; PDFs are skipped) in the notebook.
    A missing file is said so in one line instead of failing the cell."""
    from IPython.display import Image, Markdown, display

    for path in map(Path, paths):
        if path.suffix.lower() != ".png":
            continue
        if path.is_file():
            display(Image(data=png_for_display(path, max_width), format="png"))
        else:
            display(Markdown(f"*`{path.name}` is not in this figures folder: run the step that draws it.*"))


# --- Notebook 02's choices, as the next notebooks read them ------------------------------------------------------

def bits_range_rule(bits_range: Sequence[int] | dict | None) -> Callable[[float], range]:
    """Notebook 02's ``bits_range`` parameter as a rule target -> per-layer choices: None is the paper's rule
    (``allocate.paper_bits_range``: 4-7 bits above 5 average bits, 3-6 at or below), ``[lo, hi]`` one range for
    every target, and ``{target: [lo, hi]}`` a range per target (the paper's rule for the others)."""
    def checked(pair: Any, what: str) -> range:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(b, int) for b in pair)
                and 2 <= pair[0] <= pair[1] <= 16):
            raise DetrqError(f"bits_range{what} must be [lo, hi] with 2 <= lo <= hi <= 16, got {pair!r}")
        return range(pair[0], pair[1] + 1)

    if bits_range is None:
        return paper_bits_range
    if isinstance(bits_range, dict):
        ranges = {float(t): checked(v, f"[{t}]") for t, v in bits_range.items()}
        return lambda target: ranges.get(float(target), paper_bits_range(target))
    one = checked(bits_range, "")
    return lambda target: one


def target_value(text: str | float) -> float | int:
    """A target as the files name it (``6``, ``4.5``): an int when whole, so ``f"{t:g}"`` and dict keys agree."""
    value = float(text)
    return int(value) if value.is_integer() else value


class Notebook02(NamedTuple):
    """The bit maps of notebook 02's last run in a results folder."""

    allocations: dict[str, dict[float, dict[str, Any]]]  # {source: {target: allocation}} (Measured Sen included)
    replicas: list[dict[str, dict[float, dict[str, Any]]]]  # the other probe seeds' maps of the traced sources
    targets: tuple[float, ...]
    negative_traces: str
    quantizer: str


def notebook02_allocations(results_dir: str | os.PathLike) -> Notebook02:
    """What notebook 02 allocated last in ``results_dir``: the sources (traced schemes, and Measured Sen when 02
    allocated it) and targets that its seed-agreement check (``bitmaps/seed_stability.json``, rewritten on every run
    of 02) lists; each bit map read from its file, and the other probe seeds' maps of the schemes the check
    compared."""
    results = Path(results_dir)
    path = results_file(results, SEED_STABILITY_FILE)
    if not path.is_file():
        raise DetrqError(f"{path} not found: run notebook 02 (bit allocation) on this results_dir first")
    check = read_json(path)
    sources = check.get("sources", [*check["schemes"], MEASURED])  # files written before "sources": always both
    if not [n for n in sources if n != MEASURED]:
        raise DetrqError(f"{path.name} lists no scheme: rerun notebook 02 with at least one traced scheme")
    targets = tuple(target_value(t) for t in (check["targets"] if "targets" in check else check["schemes"][sources[0]]))
    allocations = {n: {t: read_json(bitmap_path(results, n, t)) for t in targets} for n in sources}
    replicas = [{n: {t: read_json(bitmap_path(results, n, t, k)) for t in targets} for n in check["schemes"]}
                for k in range(1, check["seeds"])]
    first = allocations[sources[0]][targets[0]]
    return Notebook02(allocations, replicas, targets, first.get("negative_traces", "keep"),
                      first.get("quantizer", "eq6"))


def figure2_allocations(results_dir: str | os.PathLike, target: float, names: Sequence[str]
                        ) -> tuple[float, dict[str, dict[str, Any]]]:
    """Figure 2's bit maps: those of ``names`` that notebook 02's last run allocated, at ``target`` when it
    allocated that budget, else at its nearest one (said in one printed line); ``(target drawn, {name: map})``.
    Without notebook 02's seed-agreement file, the maps at ``target`` as they are."""
    try:
        nb02 = notebook02_allocations(results_dir)
    except DetrqError:
        return target, read_allocations(results_dir, target, names)
    drawn = min(nb02.targets, key=lambda t: (abs(t - target), -t))
    if drawn != target:
        print(f"Notebook 02's last run allocated {', '.join(f'{t:g}' for t in nb02.targets)} average bits, not "
              f"{target:g}: Figure 2 shows {drawn:g} bits.")
    return drawn, {n: nb02.allocations[n][drawn] for n in names if n in nb02.allocations}


def measured_costs_cached(path: str | os.PathLike, bits: Sequence[int], quantizer: str, checkpoint_sha: str) -> bool:
    """Whether the measured-costs file at ``path`` was made for this checkpoint, these bit widths and this
    quantizer (a quick look before a scan of about a minute; the scan's cache key decides)."""
    path = Path(path)
    if not path.is_file():
        return False
    cached = read_json(path)
    settings = cached.get("settings", {})
    return (cached.get("checkpoint_sha256") == checkpoint_sha and list(settings.get("bits", [])) == list(bits)
            and settings.get("quantizer", "eq6") == quantizer)


def uncached_evaluations(jobs: Iterable[tuple[str | os.PathLike, dict[str, int]]], quantizer: str) -> int:
    """How many of ``jobs`` (evaluation file, bit map) have no file for this bit map and quantizer yet."""
    missing = 0
    for path, bit_map in jobs:
        path = Path(path)
        cached = read_json(path) if path.is_file() else None
        if cached is None or cached.get("bit_map") != bit_map or cached.get("quantizer", "eq6") != quantizer:
            missing += 1
    return missing


def settings_cached(path: str | os.PathLike, settings: dict[str, Any], checkpoint_sha: str) -> bool:
    """Whether the results file at ``path`` was made for this checkpoint with these ``settings`` (its stored
    ``settings``): a quick look before a step that takes minutes; the step's cache key decides."""
    path = Path(path)
    if not path.is_file():
        return False
    cached = read_json(path)
    return cached.get("checkpoint_sha256") == checkpoint_sha and cached.get("settings") == settings
