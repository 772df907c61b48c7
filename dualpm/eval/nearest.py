"""Exact nearest target points of source points that move a little between calls (ICP's matches).

`NearestTracker` keeps each point's k nearest target points from a KD-tree query and queries again only
when the point may have left them; `DelaunayTracker` walks the Delaunay graph of the target points from
each point's previous nearest one (no tree query once started). Both return what `cKDTree.query` returns,
up to exact ties.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
from scipy.spatial import Delaunay, cKDTree


class NearestTracker:
    """Exact nearest target point of each of N points that move a little between calls (ICP).

    When a point is queried in the tree at p, its k nearest target points (candidates) are kept with d_k,
    the distance of the k-th. Moved to x, |x - p| = m away, every other target point is at least d_k - m
    from x; so when the nearest candidate is closer than that, it is the nearest target point. Only the
    points that fail this test are queried again (a KD-tree query; far ones are slow).

    A cheaper test runs first: each point also keeps where it was last checked (c), its nearest target
    point there (at distance a) and a lower bound b on the distance from c of every other target point.
    Moved m' from c, that point is at most a + m' away and every other one at least b - m', so while
    a + 2 m' < b it is still the nearest: one (N, 3) move per call for most points, instead of the (N, k)
    candidate distances, which are evaluated only for the points that fail it (and refresh c, a and b).
    The answer is the KD-tree's, up to exact ties.
    """

    def __init__(self, tree: cKDTree, k: int = 16):
        self.tree, self.k = tree, max(1, min(k, tree.n))
        self.anchor: np.ndarray | None = None  # (N, 3) where each point was last queried in the tree
        self.candidates = np.zeros((0, self.k), dtype=np.intp)  # (N, k) nearest target points at the anchor
        self.spots = np.zeros((0, self.k, 3))  # (N, k, 3) their positions
        self.reach = np.zeros(0)  # (N,) distance of the k-th candidate at the anchor (inf: all target points)
        self.checked = np.zeros((0, 3))  # (N, 3) where each point's nearest was last established (c)
        self.index = np.zeros(0, dtype=np.intp)  # (N,) its nearest target point there
        self.nearest = np.zeros(0)  # (N,) at this distance from c (a)
        self.others = np.zeros(0)  # (N,) every other target point is at least this far from c (b)
        self.queried = 0  # points queried in the tree so far (benchmarks)
        self.evaluated = 0  # points whose k candidate distances were evaluated (benchmarks)

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """points: (N, 3) float64, the same N every call. Returns a new (N,) intp array of nearest indices."""
        if self.anchor is None:
            n = len(points)
            self.anchor, self.reach = points.copy(), np.zeros(n)
            self.candidates = np.zeros((n, self.k), np.intp)
            self.spots, self.checked = np.zeros((n, self.k, 3)), points.copy()
            self.index, self.nearest, self.others = np.zeros(n, np.intp), np.zeros(n), np.zeros(n)
            self._query(points, np.arange(n))
            return self.index.copy()
        step = points - self.checked
        moved = np.sqrt(np.einsum("nc,nc->n", step, step))
        # A margin of 1e-9 of the bound covers the rounding of the distances and of the moves.
        unsure = np.flatnonzero(self.nearest + 2.0 * moved >= self.others * (1.0 - 1e-9))
        if len(unsure):
            self.evaluated += len(unsure)
            here = points[unsure]
            offsets = self.spots[unsure] - here[:, None, :]  # (U, k, 3)
            distances = np.sqrt(np.einsum("nkc,nkc->nk", offsets, offsets))
            order = (np.argsort(distances, axis=1)[:, :2] if self.k > 1
                     else np.zeros((len(unsure), 1), np.intp))
            rows = np.arange(len(unsure))
            best = distances[rows, order[:, 0]]
            shift = here - self.anchor[unsure]
            # Every non-candidate is at least this far from the point.
            outside = self.reach[unsure] - np.sqrt(np.einsum("nc,nc->n", shift, shift))
            second = np.minimum(distances[rows, order[:, 1]], outside) if self.k > 1 else outside
            self.checked[unsure], self.index[unsure] = here, self.candidates[unsure, order[:, 0]]
            self.nearest[unsure], self.others[unsure] = best, second
            stale = unsure[best >= outside * (1.0 - 1e-9)]
            if len(stale):
                self._query(points, stale)
        return self.index.copy()

    def _query(self, points: np.ndarray, stale: np.ndarray) -> None:
        """Query `points[stale]` in the tree: new anchors, candidates and checks for those points."""
        self.queried += len(stale)
        distance, found = self.tree.query(points[stale], k=self.k)
        distance, found = distance.reshape(len(stale), self.k), found.reshape(len(stale), self.k)
        reach = distance[:, -1] if self.k < self.tree.n else np.full(len(stale), math.inf)
        self.candidates[stale], self.spots[stale] = found, self.tree.data[found]
        self.reach[stale], self.anchor[stale], self.checked[stale] = reach, points[stale], points[stale]
        self.index[stale], self.nearest[stale] = found[:, 0], distance[:, 0]
        self.others[stale] = distance[:, 1] if self.k > 1 else reach  # the second nearest target point


@dataclass(frozen=True, eq=False)
class DelaunayGraph:
    """Delaunay neighbours of M target points (`DelaunayGraph.of`): point i's are
    indices[indptr[i]:indptr[i + 1]] (every point has some), at ends[...] (E, 3) float64."""

    indptr: np.ndarray  # (M + 1,) intp
    indices: np.ndarray  # (E,) intp
    ends: np.ndarray  # (E, 3) float64: points[indices]
    half_inverse: np.ndarray  # (E,) float64: 1 / (2 x edge length)
    spacing: float  # mean edge length
    max_degree: int  # most neighbours of one point

    @staticmethod
    def of(points: np.ndarray) -> DelaunayGraph | None:
        """The graph of (M, 3) float64 points; None when some point is not a vertex of the triangulation
        (duplicates, too few points in general position)."""
        if len(points) < 5:
            return None
        # Qhull inserts points faster in a random order than in a spatially sorted one (fixed: the graph,
        # hence every answer, does not depend on it anyway).
        order = np.random.default_rng(0).permutation(len(points))
        triangulation = Delaunay(points[order])
        if len(triangulation.coplanar):
            return None
        shuffled_ptr, shuffled = triangulation.vertex_neighbor_vertices
        source = np.repeat(order, np.diff(shuffled_ptr))  # (E,) edges in the points' own numbering
        sort = np.argsort(source, kind="stable")
        indices = order[shuffled][sort]
        degree = np.bincount(source, minlength=len(points))
        if np.any(degree == 0):
            return None
        indptr = np.concatenate([[0], np.cumsum(degree)])
        ends = points[indices]
        lengths = np.linalg.norm(ends - np.repeat(points, degree, axis=0), axis=1)
        return DelaunayGraph(indptr, indices, ends, 0.5 / lengths, float(lengths.mean()), int(degree.max()))


class DelaunayTracker:
    """Exact nearest target point of each of N points that move between calls (ICP), by walking the
    Delaunay graph of the target points.

    The Voronoi cell of a target point p (where p is the nearest) is bounded by the bisector planes between
    p and its Delaunay neighbours q, and a target point that is not the nearest to x has a neighbour closer
    to x. So each point keeps where it was last resolved (c) and its slack there: the distance from c to the
    nearest of those planes, (|c - q|^2 - |c - p|^2) / (2 |p - q|) at its least. Moved less than the slack
    from c, p is still its nearest target point: one (N, 3) move per call. Moved less than the distance to
    the second-nearest plane, only the nearest one can have been crossed: one plane test. The others walk
    from p to the closest of its neighbours while that is closer (one step, about 16 distances, when p
    stays the nearest), and the last step's distances give the new slacks. Points that moved farther than
    a few neighbour spacings (the first call, a flipped start) are queried in the KD-tree instead, with the
    slack (second-nearest distance - nearest) / 2 (every other target point is at least that much
    farther). The answer is the KD-tree's, up to exact ties.

    Args:
        tree: a `cKDTree` of the target points; graph: their `DelaunayGraph`.
    """

    MAX_STEPS = 8  # points still walking after this many steps are queried in the tree

    def __init__(self, tree: cKDTree, graph: DelaunayGraph):
        self.tree, self.graph = tree, graph
        self.checked: np.ndarray | None = None  # (N, 3) where each point's nearest was last resolved (c)
        self.index = np.zeros(0, dtype=np.intp)  # (N,) nearest target point there
        self.slack = np.zeros(0)  # (N,) a move shorter than this keeps that nearest target point
        self.plane = np.zeros(0, dtype=np.intp)  # (N,) edge of the nearest bisector plane (-1: unknown)
        self.slack2 = np.zeros(0)  # (N,) a move shorter than this can only cross that plane
        self.queried = 0  # points queried in the tree so far (benchmarks)
        self.walked = 0  # walk steps of single points so far (benchmarks)

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """points: (N, 3) float64, the same N every call. Returns a new (N,) intp array of nearest indices."""
        if self.checked is None:
            n = len(points)
            self.checked, self.index, self.slack = points.copy(), np.zeros(n, np.intp), np.zeros(n)
            self.plane, self.slack2 = np.full(n, -1, np.intp), np.zeros(n)
            self._query(points, np.arange(n))
            return self.index.copy()
        graph = self.graph
        points = np.ascontiguousarray(points, dtype=np.float64)
        stale = np.empty(len(points), np.intp)
        count, walked = _track(points, self.checked, self.index, self.slack, self.plane, self.slack2,
                               self.tree.data, graph.indptr, graph.indices, graph.ends, graph.half_inverse,
                               4.0 * graph.spacing, self.MAX_STEPS, np.empty(graph.max_degree), stale)
        self.walked += walked
        if count:
            self._query(points, stale[:count])
        return self.index.copy()

    def _query(self, points: np.ndarray, rows: np.ndarray) -> None:
        self.queried += len(rows)
        distance, found = self.tree.query(points[rows], k=2)
        self.checked[rows], self.index[rows] = points[rows], found[:, 0]
        # A margin of 1e-9 of the distances covers their rounding and that of the moves.
        self.slack[rows] = 0.5 * (distance[:, 1] - distance[:, 0]) - 1e-9 * distance[:, 1]
        self.plane[rows], self.slack2[rows] = -1, self.slack[rows]


@numba.njit(cache=True, nogil=True)
def _track(points, checked, index, slack, plane, slack2, data, indptr, indices, ends, half_inverse,
           far, max_steps, squared, stale):
    """`DelaunayTracker`'s update of every point, in place (see its docstring): the slack test, the plane
    test, the walk. Points that moved farther than `far` or still walk after `max_steps` steps are written
    to `stale` for a KD-tree query; `squared` (at least the largest degree) holds one walker's neighbour
    distances. Returns (count of stale points, walk steps taken)."""
    count = walked = 0
    for i in range(points.shape[0]):
        x, y, z = points[i, 0], points[i, 1], points[i, 2]
        dx, dy, dz = x - checked[i, 0], y - checked[i, 1], z - checked[i, 2]
        moved = math.sqrt(dx * dx + dy * dy + dz * dz)
        if moved < slack[i]:
            continue
        if moved > far:
            stale[count] = i
            count += 1
            continue
        current = index[i]
        dx, dy, dz = data[current, 0] - x, data[current, 1] - y, data[current, 2] - z
        best = dx * dx + dy * dy + dz * dz  # squared distance to the current target point
        if moved < slack2[i] and plane[i] >= 0:
            # Only the nearest bisector plane can have been crossed: still on p's side of it, p is nearest.
            e = plane[i]
            dx, dy, dz = ends[e, 0] - x, ends[e, 1] - y, ends[e, 2] - z
            q_sq = dx * dx + dy * dy + dz * dz
            if q_sq - best > 1e-9 * q_sq:  # a margin for the rounding of the squares
                continue
        for _ in range(max_steps):
            closest, step_to, first = math.inf, -1, indptr[current]
            for e in range(first, indptr[current + 1]):
                dx, dy, dz = ends[e, 0] - x, ends[e, 1] - y, ends[e, 2] - z
                squared[e - first] = dx * dx + dy * dy + dz * dz
                if squared[e - first] < closest:
                    closest, step_to = squared[e - first], e
            walked += 1
            if closest < best:  # move to the closest neighbour
                current, best = indices[step_to], closest
                continue
            # Settled: the distances to the nearest two bisector planes, less a margin of 1e-9 of the
            # distances for the rounding of the squares and of the moves.
            least = second = math.inf
            at = -1
            for e in range(first, indptr[current + 1]):
                gap = (squared[e - first] - best) * half_inverse[e]
                if gap < least:
                    second, least, at = least, gap, e
                elif gap < second:
                    second = gap
            margin = 1e-9 * math.sqrt(closest)
            checked[i, 0], checked[i, 1], checked[i, 2] = x, y, z
            index[i], plane[i] = current, at
            slack[i], slack2[i] = least - margin, second - margin
            break
        else:  # still walking after max_steps
            stale[count] = i
            count += 1
    return count, walked
