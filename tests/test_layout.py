"""The layout of the code: the import rules of pyproject.toml hold, no module imports itself back
through others, and no module is longer than a reader can hold (600 lines)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dualpm", "pipeline")
MAX_LINES = 600


def test_import_contracts_hold():
    # Layers (commands above stages above formats), eval never importing infer, the library never
    # importing the pipeline, no cycles between siblings: import-linter's own command on pyproject.toml.
    here = Path(sys.executable).parent / "lint-imports"
    command = str(here) if here.exists() else shutil.which("lint-imports")
    assert command, "lint-imports not found: install the dev extra (pip install -e '.[dev]')"
    proc = subprocess.run([command, "--config", "pyproject.toml", "--no-cache"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    report = proc.stdout[proc.stdout.find("Contracts"):] + proc.stderr
    assert proc.returncode == 0, report
    counts = re.search(r"Contracts: (\d+) kept, 0 broken", report)
    assert counts and int(counts[1]) >= 5, report  # every contract of pyproject.toml was read and kept


def test_no_module_is_part_of_an_import_cycle():
    # Module by module (a package's __init__ included), every import, also those inside functions and
    # under TYPE_CHECKING: the strongly connected components of the import graph are single modules.
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    modules = sorted(graph.modules)
    index = {name: i for i, name in enumerate(modules)}
    edges = [(index[a], index[b]) for a in modules for b in graph.find_modules_directly_imported_by(a)]
    rows, cols = np.array(edges).T
    adjacency = coo_matrix((np.ones(len(edges)), (rows, cols)), shape=(len(modules), len(modules)))
    _, component = connected_components(adjacency, directed=True, connection="strong")
    cycles = [sorted(m for m in modules if component[index[m]] == c) for c in np.unique(component)
              if np.count_nonzero(component == c) > 1]
    assert len(modules) > 50 and len(edges) > 200  # the graph was really built
    assert cycles == [], f"modules that import each other (directly or through others): {cycles}"


def test_no_module_is_longer_than_600_lines():
    lengths = {str(path.relative_to(REPO)): len(path.read_text().splitlines())
               for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))}
    assert len(lengths) > 50
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}
