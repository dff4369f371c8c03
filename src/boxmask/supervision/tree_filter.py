"""Minimum spanning trees on pixel grids and the Learnable Tree Filter, in pure PyTorch.

Used by BoxLevelSet's high-level level-set target (methods.md §3.3, §7 item 8): the references ship
these as a CUDA extension; here everything is batched tensor code that runs on any device.

* :func:`grid_mst` builds, without gradient, one minimum spanning tree per graph of a batch of
  4-connected ``H x W`` grids (edge cost = squared L2 distance of the guide between the two pixels).
  Borůvka's algorithm runs on all graphs at once (``O(log V)`` rounds, each a handful of
  scatter/gather kernels over the still-active edges, components merged by pointer jumping); the
  tree is then rooted by an Euler tour ranked by pointer jumping (``O(log V)`` kernels as well), so
  no step loops over pixels in Python. The root is the tree's centre by default, which halves the
  tree depth and with it the cost of the filter.
* :func:`tree_filter` is the tree filter of Song et al., "Learnable Tree Filter for
  Structure-preserving Feature Transform", NeurIPS 2019 (Eq. 3-5):
  ``out_i = sum_j S(i, j) x_j / sum_j S(i, j)`` where ``S(i, j)`` is the product of the edge
  affinities ``exp(-|g_a - g_b|^2 / sigma)`` along the tree path from ``i`` to ``j``. It is exact and
  ``O(V)`` per channel: one leaf-to-root and one root-to-leaf pass, each vectorised over all nodes of
  one tree depth (``O(depth)`` kernel launches, independent of the channel and graph count).

Shapes use ``N`` graphs (images or instances), ``V = H * W`` nodes per graph and nodes numbered
row-major, ``v = y * W + x``; a node of graph ``n`` has the flat id ``n * V + v``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["GridTree", "grid_mst", "tree_filter", "tree_edge_affinity"]

# Grid directions of a node's (up to) 4 tree arcs, in the cyclic order the Euler tour uses.
_RIGHT, _DOWN, _LEFT, _UP = 0, 1, 2, 3


@dataclass(frozen=True)
class GridTree:
    """Rooted spanning trees of ``N`` grid graphs of ``H x W`` pixels, laid out for level-wise passes.

    All graphs share one node ordering, by depth: ``order`` lists the flat node ids ``n * V + v``
    sorted by their depth in their own tree (stable, so ties keep id order); nodes of depth ``d`` of
    every graph are ``order[level_offsets[d]:level_offsets[d + 1]]`` and the ``N`` roots come first.
    Positions ``s`` in that ordering are what the filter works on.

    Attributes:
        num_graphs, height, width: ``N``, ``H``, ``W``.
        order: int64 ``[N * V]``, flat node id at each position (a BFS order of every tree).
        position: int64 ``[N * V]``, inverse permutation of ``order`` (position of each flat node).
        parent: int64 ``[N * V]``, position of the parent of the node at each position; a root
            points to itself.
        level_offsets: Python ints, length ``max_depth + 2``, starts of the depth levels in ``order``.
        parent_index: int64 ``[N, V]``, parent of each node as an in-graph index ``v``; ``-1`` at the
            root. The tree edges are exactly ``(v, parent_index[n, v])`` for the ``V - 1`` non-roots.
        depth: int64 ``[N, V]``, number of edges between each node and its root.
    """

    num_graphs: int
    height: int
    width: int
    order: Tensor
    position: Tensor
    parent: Tensor
    level_offsets: tuple[int, ...]
    parent_index: Tensor
    depth: Tensor

    @property
    def num_nodes(self) -> int:
        """``V = H * W``, nodes per graph."""
        return self.height * self.width

    @property
    def max_depth(self) -> int:
        """Largest depth over all graphs (the passes of :func:`tree_filter` launch ``O(max_depth)`` kernels)."""
        return len(self.level_offsets) - 2

    @property
    def device(self) -> torch.device:
        return self.order.device


# ----------------------------------------------------------------------------------- MST


def _grid_edges(h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """End points ``(u, v)`` (in-graph indices, int64 ``[E]``) of the 4-connected grid edges:
    the ``H (W - 1)`` horizontal edges row-major, then the ``(H - 1) W`` vertical ones."""
    idx = torch.arange(h * w, device=device).view(h, w)
    eu = torch.cat([idx[:, :-1].reshape(-1), idx[:-1, :].reshape(-1)])
    ev = torch.cat([idx[:, 1:].reshape(-1), idx[1:, :].reshape(-1)])
    return eu, ev


def _grid_edge_costs(guide: Tensor) -> Tensor:
    """Squared L2 guide difference of every grid edge, ``[N, C, H, W]`` -> ``[N, E]`` (order of :func:`_grid_edges`)."""
    dh = (guide[..., :, 1:] - guide[..., :, :-1]).pow(2).sum(dim=1).flatten(1)
    dv = (guide[..., 1:, :] - guide[..., :-1, :]).pow(2).sum(dim=1).flatten(1)
    return torch.cat([dh, dv], dim=1)


def _take(values: Tensor, index: Tensor) -> Tensor:
    """``values[index]`` along dim 0 via ``index_select`` (several times faster than advanced indexing on CPU)."""
    return torch.index_select(values, 0, index)


def _boruvka(cost: Tensor, eu: Tensor, ev: Tensor, num_nodes: int) -> Tensor:
    """Batched Borůvka: bool ``[N, E]`` marking the MST edges of each of the ``N`` graphs.

    Edges are compared by their rank in a stable per-graph sort of ``cost``, a strict total order,
    so equal costs cannot create cycles. Each round every component picks its cheapest outgoing edge
    (two ``scatter_reduce(amin)``), components hook onto the component across that edge, the only
    possible cycles (mutual picks of the same edge) are broken at the smaller label, and pointer
    jumping flattens the hooks into new labels. Edges inside a component are dropped for good, so
    rounds get cheaper; there are at most ``ceil(log2 V)`` rounds.
    """
    n, e = cost.shape
    device = cost.device
    rank = torch.empty((n, e), dtype=torch.long, device=device)
    rank.scatter_(1, cost.argsort(dim=1, stable=True), torch.arange(e, device=device).expand(n, e))
    key = rank.reshape(-1)
    base = (torch.arange(n, device=device) * num_nodes)[:, None]
    gu = (eu[None, :] + base).reshape(-1)
    gv = (ev[None, :] + base).reshape(-1)
    total = n * num_nodes
    ids = torch.arange(total, device=device)
    comp = ids.clone()
    in_mst = torch.zeros(n * e, dtype=torch.bool, device=device)
    while gu.numel():
        cu, cv = _take(comp, gu), _take(comp, gv)
        keep = cu != cv
        if not bool(keep.all()):
            key, gu, gv, cu, cv = key[keep], gu[keep], gv[keep], cu[keep], cv[keep]
            if not gu.numel():
                break
        best = torch.full((total,), e, dtype=torch.long, device=device)
        best.scatter_reduce_(0, cu, key, reduce="amin")
        best.scatter_reduce_(0, cv, key, reduce="amin")
        # keys are unique within a graph, so exactly one edge matches each component's minimum
        pick_u, pick_v = key == _take(best, cu), key == _take(best, cv)
        picked = pick_u | pick_v
        in_mst[(gu[picked] // num_nodes) * e + key[picked]] = True  # mark by (graph, rank) ...
        hook = ids.clone()
        hook[cu[pick_u]] = cv[pick_u]
        hook[cv[pick_v]] = cu[pick_v]
        mutual = (_take(hook, hook) == ids) & (ids < hook)
        hook = torch.where(mutual, ids, hook)
        while True:
            nxt = _take(hook, hook)
            if torch.equal(nxt, hook):
                break
            hook = nxt
        comp = _take(hook, comp)
    # ... and map ranks back to edge indices
    return in_mst.view(n, e).gather(1, rank)


# ------------------------------------------------------------------------- rooting the tree


@dataclass
class _Tour:
    """Euler tour of the trees: ``M = 2 N (V - 1)`` arcs (each tree edge in both directions)."""

    arc_ids: Tensor  # [M] sorted global arc ids ``node * 4 + direction``
    src: Tensor  # [M] flat node the arc leaves
    dst: Tensor  # [M] flat node the arc enters
    rev: Tensor  # [M] index of the reverse arc
    succ: Tensor  # [M] next arc of the (cyclic) tour
    graph: Tensor  # [M] graph of the arc
    length: int  # L = 2 (V - 1), arcs per graph


def _euler_tour(in_mst: Tensor, h: int, w: int) -> _Tour:
    """Euler tour of each tree: after arc ``u -> v`` comes the next tree arc out of ``v`` after
    ``v -> u`` in the cyclic direction order right, down, left, up (a leaf turns straight back)."""
    n = in_mst.shape[0]
    device = in_mst.device
    nh = h * (w - 1)
    adj = torch.zeros(n, h, w, 4, dtype=torch.bool, device=device)
    th = in_mst[:, :nh].view(n, h, w - 1)
    tv = in_mst[:, nh:].view(n, h - 1, w)
    adj[:, :, :-1, _RIGHT] = th
    adj[:, :, 1:, _LEFT] = th
    adj[:, :-1, :, _DOWN] = tv
    adj[:, 1:, :, _UP] = tv
    adj = adj.view(-1, 4)
    arc_ids = adj.view(-1).nonzero().squeeze(1)
    src, direction = arc_ids // 4, arc_ids % 4
    step = torch.tensor([1, w, -1, -w], device=device)
    dst = src + _take(step, direction)
    lut = torch.full((adj.numel(),), -1, dtype=torch.long, device=device)
    lut[arc_ids] = torch.arange(arc_ids.numel(), device=device)
    back = (direction + 2) % 4
    rev = _take(lut, dst * 4 + back)
    cand = (back[:, None] + torch.arange(1, 5, device=device)) % 4  # last candidate = the way back
    first = adj.view(-1)[dst[:, None] * 4 + cand].to(torch.int32).argmax(dim=1, keepdim=True)
    succ = _take(lut, dst * 4 + cand.gather(1, first).squeeze(1))
    return _Tour(arc_ids, src, dst, rev, succ, src // (h * w), 2 * (h * w - 1))


def _tour_positions(tour: _Tour, n: int, v: int) -> Tensor:
    """Position of every arc in its graph's tour when the cycle is cut before the first arc leaving
    in-graph node 0: list ranking by pointer jumping (``ceil(log2 L)`` steps). The only ranking done;
    other roots just rotate these positions."""
    m, length = tour.src.numel(), tour.length
    device = tour.src.device
    # int32 halves the memory traffic of the random gathers (flat arc ids stay far below 2**31)
    idx_dtype = torch.int32 if m < 2**31 else torch.long
    start = torch.searchsorted(tour.arc_ids, torch.arange(n, device=device) * (4 * v))
    is_start = torch.zeros(m, dtype=torch.bool, device=device)
    is_start[start] = True
    last = _take(is_start, tour.succ)
    nxt = torch.where(last, torch.arange(m, device=device), tour.succ).to(idx_dtype)
    dist = (~last).to(idx_dtype)
    for _ in range(max(1, (length - 1).bit_length())):
        dist = dist + _take(dist, nxt)
        nxt = _take(nxt, nxt)
    return (length - 1) - dist.long()


@dataclass
class _Rooted:
    pos: Tensor  # [M] position of each arc in its graph's tour from the root
    down: Tensor  # [M] bool, arc goes from parent to child
    depth_after: Tensor  # [M] depth reached after the arc
    depth: Tensor  # [N * V] node depth
    parent: Tensor  # [N * V] flat parent id (roots: themselves)


def _orient(tour: _Tour, pos0: Tensor, roots: Tensor, num_total: int) -> _Rooted:
    """Orient the trees from ``roots`` (flat ids ``[N]``): rotate the tour to start at the first arc
    leaving the root, and call an arc ``u -> v`` a parent->child arc iff it comes before ``v -> u``.
    Depths are a per-graph cumsum of +1/-1 along the tour."""
    m, length = tour.src.numel(), tour.length
    device = tour.src.device
    start = torch.searchsorted(tour.arc_ids, roots * 4)  # arcs are sorted by node, then direction
    pos = torch.remainder(pos0 - _take(_take(pos0, start), tour.graph), length)
    down = pos < _take(pos, tour.rev)
    slot = tour.graph * length + pos
    sign = torch.empty(m, dtype=torch.long, device=device)
    sign[slot] = torch.where(down, 1, -1)
    depth_after = _take(sign.view(-1, length).cumsum(dim=1).view(-1), slot)
    child = tour.dst[down]
    depth = torch.zeros(num_total, dtype=torch.long, device=device)
    depth[child] = depth_after[down]
    parent = torch.arange(num_total, device=device)
    parent[child] = tour.src[down]
    return _Rooted(pos, down, depth_after, depth, parent)


def _tree_centres(tour: _Tour, pos0: Tensor, n: int, v: int) -> Tensor:
    """Flat ids ``[N]`` of a centre of each tree (a middle node of a longest path): the node ``a``
    farthest from node 0 ends a longest path ``a .. b``; the centre is the ancestor of ``b`` at depth
    ``ceil(D / 2)`` in the tree rooted at ``a``, i.e. the target of the last parent->child arc to that
    depth before the arc entering ``b``."""
    device = tour.src.device
    base = torch.arange(n, device=device) * v
    first = _orient(tour, pos0, base, n * v)
    a = first.depth.view(n, v).argmax(dim=1) + base
    from_a = _orient(tour, pos0, a, n * v)
    diam, b = from_a.depth.view(n, v).max(dim=1)
    target_depth = (diam + 1) // 2
    entry_b = torch.full((n,), -1, dtype=torch.long, device=device)
    into_b = from_a.down & (tour.dst == _take(b + base, tour.graph))
    entry_b[tour.graph[into_b]] = from_a.pos[into_b]
    ok = (from_a.down & (from_a.depth_after == _take(target_depth, tour.graph))
          & (from_a.pos <= _take(entry_b, tour.graph)))
    best = torch.full((n,), -1, dtype=torch.long, device=device)
    best.scatter_reduce_(0, tour.graph[ok], from_a.pos[ok], reduce="amax")
    arc_at = torch.empty_like(from_a.pos)
    arc_at[tour.graph * tour.length + from_a.pos] = torch.arange(tour.src.numel(), device=device)
    return tour.dst[arc_at[torch.arange(n, device=device) * tour.length + best]]


@torch.no_grad()
def grid_mst(guide: Tensor, root: str = "centre") -> GridTree:
    """Minimum spanning tree of each 4-connected pixel grid, weighted by guide differences.

    Edge ``(a, b)`` between horizontally or vertically adjacent pixels costs ``|guide_a - guide_b|^2``
    (sum over channels; the references add a constant 1, which does not change the tree). Runs under
    ``no_grad`` (the tree is discrete); batched Borůvka then an Euler-tour rooting, see the module doc.
    Work is ``O(N V log V)``; kernel launches are ``O(log^2 V)`` (Borůvka rounds x pointer jumps) and
    do not grow with ``N``. With tied costs the tree is one of the minimum ones (ties broken by edge
    index), deterministic for a given input.

    Args:
        guide: float ``[N, C, H, W]`` (any float dtype; differences are taken in float32, float64 kept).
        root: ``"centre"`` (default) roots each tree at a centre of its longest path, minimising the
            depth and so the cost of :func:`tree_filter`; ``"corner"`` roots it at pixel ``(0, 0)``
            (cheaper to build, up to twice as deep).

    Returns:
        :class:`GridTree` on ``guide``'s device.

    Raises:
        ValueError: if ``guide`` is not 4-D, has an empty dimension or ``root`` is unknown.
    """
    if guide.dim() != 4 or 0 in guide.shape:
        raise ValueError(f"grid_mst: guide must be a non-empty [N, C, H, W], got {tuple(guide.shape)}")
    if root not in ("centre", "corner"):
        raise ValueError(f"grid_mst: root must be 'centre' or 'corner', got {root!r}")
    n, _, h, w = guide.shape
    v = h * w
    device = guide.device
    base = torch.arange(n, device=device) * v
    if v == 1:
        depth = torch.zeros(n, dtype=torch.long, device=device)
        parent = torch.arange(n, device=device)
    else:
        g = guide.detach()
        g = g if g.dtype == torch.float64 else g.float()
        eu, ev = _grid_edges(h, w, device)
        in_mst = _boruvka(_grid_edge_costs(g), eu, ev, v)
        tour = _euler_tour(in_mst, h, w)
        pos0 = _tour_positions(tour, n, v)
        roots = _tree_centres(tour, pos0, n, v) if root == "centre" else base
        rooted = _orient(tour, pos0, roots, n * v)
        depth, parent = rooted.depth, rooted.parent
    order = torch.argsort(depth, stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(n * v, device=device)
    counts = torch.bincount(depth)
    offsets = [0] + torch.cumsum(counts, 0).tolist()
    is_root = parent == torch.arange(n * v, device=device)
    parent_index = (parent - base.repeat_interleave(v)).masked_fill(is_root, -1).view(n, v)
    return GridTree(
        num_graphs=n,
        height=h,
        width=w,
        order=order,
        position=position,
        parent=position[parent[order]],
        level_offsets=tuple(int(o) for o in offsets),
        parent_index=parent_index,
        depth=depth.view(n, v),
    )


# ----------------------------------------------------------------------------- tree filter


def _up_pass(x: Tensor, w: Tensor, parent: Tensor, offsets: tuple[int, ...]) -> Tensor:
    """Leaf-to-root ``A_i = x_i + sum_children w_c A_c`` on level-sorted rows ``[M, C]``:
    ``A_i = sum_{j in subtree(i)} S(i, j) x_j``. One ``index_add_`` per depth, deepest first."""
    agg = x.clone()
    for d in range(len(offsets) - 2, 0, -1):
        lo, hi = offsets[d], offsets[d + 1]
        agg.index_add_(0, parent[lo:hi], agg[lo:hi] * w[lo:hi, None])
    return agg


def _down_pass(agg: Tensor, w: Tensor, parent: Tensor, offsets: tuple[int, ...]) -> Tensor:
    """Root-to-leaf ``out_i = A_i (1 - w_i^2) + w_i out_parent``: ``out_i = sum_j S(i, j) x_j``.

    ``out_parent`` already holds the subtree of ``i`` as ``w_i A_i``; the ``(1 - w_i^2)`` removes the echo."""
    out = agg.clone()
    keep = 1.0 - w * w
    for d in range(1, len(offsets) - 1):
        lo, hi = offsets[d], offsets[d + 1]
        torch.addcmul(agg[lo:hi] * keep[lo:hi, None], w[lo:hi, None], out.index_select(0, parent[lo:hi]),
                      out=out[lo:hi])
    return out


class _TreeAggregate(torch.autograd.Function):
    """``Y = S X`` for level-sorted rows ``X [M, C]`` and edge affinities ``w [M]`` (roots: 0).

    Backward (exact, no autograd graph over the levels): ``S`` is symmetric, so ``dL/dX = S G`` is
    the same two passes on ``G = dL/dY``. For the edge of node ``c`` with parent ``p`` every path
    through it splits into ``subtree(c)`` and the rest, giving
    ``dL/dw_c = sum_ch [A^G_c (Y_p - w_c A^X_c) + A^X_c (Y^G_p - w_c A^G_c)]`` with ``A`` the up-pass
    aggregates (``Y_p - w_c A_c`` is the sum over nodes outside ``subtree(c)`` seen from ``p``).
    Saves ``A^X`` and ``Y`` (two copies of ``X``).
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, parent: Tensor, offsets: tuple[int, ...]) -> Tensor:
        agg = _up_pass(x, w, parent, offsets)
        out = _down_pass(agg, w, parent, offsets)
        ctx.save_for_backward(agg, out, w, parent)
        ctx.offsets = offsets
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        agg, out, w, parent = ctx.saved_tensors
        offsets = ctx.offsets
        g_agg = _up_pass(grad_out.contiguous(), w, parent, offsets)
        g_out = _down_pass(g_agg, w, parent, offsets)
        grad_x = g_out if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            wc = w[:, None]
            grad_w = (g_agg * (_take(out, parent) - wc * agg) + agg * (_take(g_out, parent) - wc * g_agg)).sum(dim=1)
            grad_w[: offsets[1]] = 0.0  # roots have no edge
        return grad_x, grad_w, None, None


def tree_edge_affinity(guide: Tensor, tree: GridTree, sigma: float) -> Tensor:
    """Affinity ``exp(-|guide_i - guide_parent(i)|^2 / sigma)`` of each node's edge to its parent,
    at the tree's positions: float ``[N * V]`` (roots: 0). Differentiable w.r.t. ``guide``.

    Args:
        guide: float ``[N, C, H, W]`` matching the tree.
        tree: from :func:`grid_mst`.
        sigma: range parameter (> 0), in squared guide units.
    """
    rows = _take(guide.permute(0, 2, 3, 1).reshape(-1, guide.shape[1]), tree.order)
    dist = (rows - _take(rows, tree.parent)).pow(2).sum(dim=1)
    w = torch.exp(-dist / sigma)
    is_root = torch.zeros_like(w, dtype=torch.bool)
    is_root[: tree.level_offsets[1]] = True
    return w.masked_fill(is_root, 0.0)


def _slots(im_inds: Tensor, num_images: int) -> tuple[Tensor, int]:
    """Rank of each instance among the instances of its image (``[K]``) and the largest count."""
    k = im_inds.numel()
    order = torch.argsort(im_inds, stable=True)
    counts = torch.bincount(im_inds, minlength=num_images)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(im_inds)
    slot[order] = torch.arange(k, device=im_inds.device) - starts[im_inds[order]]
    return slot, int(counts.max()) if k else 0


def tree_filter(
    x: Tensor,
    guide: Tensor,
    tree: GridTree | None,
    sigma: float,
    *,
    guide_grad: bool = False,
    im_inds: Tensor | None = None,
) -> Tensor:
    """Learnable Tree Filter: ``out_i = sum_j S(i, j) x_j / sum_j S(i, j)`` over a grid MST.

    ``S(i, j)`` is the product over the tree path ``i .. j`` of the edge affinities
    ``exp(-|g_a - g_b|^2 / sigma)`` (Song et al., NeurIPS 2019, Eq. 3-5; BoxLevelSet uses
    ``sigma = 0.02`` on the normalised image and ``sigma = 1`` on the 5-channel level-set feature,
    methods.md §3.3). ``S(i, i) = 1``, so the normaliser is >= 1. Computed exactly by a leaf-to-root
    and a root-to-leaf pass over the tree depths (see :class:`_TreeAggregate`), applied to ``x`` and a
    ones channel. A constant ``x`` is returned unchanged. Gradients flow to ``x`` always and to
    ``guide`` (through the affinities, not through the discrete tree) iff ``guide_grad``.
    On CUDA the per-level ``index_add_`` is atomic, so results are not bitwise deterministic.

    Args:
        x: float ``[N, Cx, H, W]``, or ``[K, Cx, H, W]`` with ``im_inds``.
        guide: float ``[N, Cg, H, W]`` that defines the affinities (usually the tree's guide).
        tree: :func:`grid_mst` of ``N`` graphs of ``H x W``; ``None`` builds ``grid_mst(guide)``.
        sigma: affinity range parameter (> 0), in squared guide units.
        guide_grad: let gradients flow into ``guide``.
        im_inds: optional int64 ``[K]``: instance ``k`` is filtered on tree/guide ``im_inds[k]``. The
            trees are not copied: the instances of one image are filtered together as channels.

    Returns:
        float32 ``[N or K, Cx, H, W]`` (float64 for float64 ``x``).

    Raises:
        ValueError: on shape mismatch, ``sigma <= 0`` or ``im_inds`` out of range.
    """
    if guide.dim() != 4:
        raise ValueError(f"tree_filter: guide must be [N, C, H, W], got {tuple(guide.shape)}")
    if sigma <= 0:
        raise ValueError(f"tree_filter: sigma must be > 0, got {sigma}")
    n, _, h, w = guide.shape
    if tree is None:
        tree = grid_mst(guide)
    if (tree.num_graphs, tree.height, tree.width) != (n, h, w):
        raise ValueError(
            f"tree_filter: tree is for {(tree.num_graphs, tree.height, tree.width)} graphs/HxW, guide is {(n, h, w)}"
        )
    if x.dim() != 4 or tuple(x.shape[2:]) != (h, w):
        raise ValueError(f"tree_filter: x must be [N, C, {h}, {w}], got {tuple(x.shape)}")
    if im_inds is None and x.shape[0] != n:
        raise ValueError(f"tree_filter: x has {x.shape[0]} maps but the tree has {n} graphs (pass im_inds?)")
    if im_inds is not None:
        if im_inds.shape != (x.shape[0],):
            raise ValueError(f"tree_filter: im_inds must be [K] = [{x.shape[0]}], got {tuple(im_inds.shape)}")
        if im_inds.numel() and (int(im_inds.min()) < 0 or int(im_inds.max()) >= n):
            raise ValueError(f"tree_filter: im_inds out of range for {n} graphs")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(dtype)
    cx = x.shape[1]
    if x.shape[0] == 0 or cx == 0:
        return x * 0.0
    guide = guide.to(device=x.device, dtype=dtype)
    if guide_grad:
        w_edges = tree_edge_affinity(guide, tree, sigma)
    else:
        with torch.no_grad():
            w_edges = tree_edge_affinity(guide.detach(), tree, sigma)
    if im_inds is not None:
        # instances become channels of their image's graph; unused slots stay zero
        im_inds = im_inds.to(device=x.device, dtype=torch.long)
        slot, groups = _slots(im_inds, n)
        grouped = x.new_zeros(n, groups, cx, h, w)
        grouped = grouped.index_put((im_inds, slot), x)
        x_graph = grouped.view(n, groups * cx, h, w)
    else:
        x_graph = x
    c = x_graph.shape[1]
    rows = _take(x_graph.permute(0, 2, 3, 1).reshape(n * h * w, c), tree.order)
    rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    agg = _TreeAggregate.apply(rows, w_edges, tree.parent, tree.level_offsets)
    out = _take(agg[:, :c] / agg[:, c:], tree.position).view(n, h, w, c).permute(0, 3, 1, 2)
    if im_inds is not None:
        out = out.reshape(n, -1, cx, h, w)[im_inds, slot]
    return out.contiguous()
