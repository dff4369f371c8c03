"""Tests for boxmask.supervision.tree_filter: grid MST (vs scipy) and the tree filter (vs brute force)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components, minimum_spanning_tree, shortest_path

from boxmask.supervision.tree_filter import GridTree, grid_mst, tree_edge_affinity, tree_filter

torch.set_num_threads(1)


def _grid_graph(guide: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4-connected edges (u, v, squared-L2 cost) of one ``[C, H, W]`` guide, by explicit loops."""
    c, h, w = guide.shape
    us, vs, cs = [], [], []
    for y in range(h):
        for x in range(w):
            for dy, dx in ((0, 1), (1, 0)):
                yy, xx = y + dy, x + dx
                if yy < h and xx < w:
                    us.append(y * w + x)
                    vs.append(yy * w + xx)
                    cs.append(float(((guide[:, y, x] - guide[:, yy, xx]) ** 2).sum()))
    return np.array(us), np.array(vs), np.array(cs)


def _tree_edges(tree: GridTree, n: int) -> list[tuple[int, int]]:
    par = tree.parent_index[n].tolist()
    return [(v, p) for v, p in enumerate(par) if p >= 0]


# ---------------------------------------------------------------------------------- MST


@pytest.mark.parametrize("n,c,h,w,root", [(3, 3, 7, 9, "centre"), (2, 5, 12, 5, "corner"), (2, 1, 1, 8, "centre"),
                                          (1, 2, 9, 1, "corner"), (4, 3, 16, 16, "centre"), (2, 2, 2, 2, "centre")])
def test_grid_mst_matches_scipy_and_spans(n, c, h, w, root):
    g = torch.Generator().manual_seed(h * 31 + w)
    guide = torch.rand(n, c, h, w, generator=g, dtype=torch.float64)
    tree = grid_mst(guide, root=root)
    v = h * w
    assert tree.parent_index.shape == (n, v) and tree.depth.shape == (n, v)
    assert sorted(tree.order.tolist()) == list(range(n * v))
    assert torch.equal(tree.order[tree.position], torch.arange(n * v))
    for k in range(n):
        gk = guide[k].numpy()
        us, vs, cs = _grid_graph(gk)
        ref = minimum_spanning_tree(coo_matrix((cs, (us, vs)), shape=(v, v))).sum()
        edges = _tree_edges(tree, k)
        assert len(edges) == v - 1
        assert (tree.parent_index[k] == -1).sum() == 1
        cost = {(min(a, b), max(a, b)): cc for a, b, cc in zip(us.tolist(), vs.tolist(), cs.tolist())}
        # every tree edge is a grid edge; the tree is connected (so, with V - 1 edges, a spanning tree)
        total = sum(cost[(min(a, b), max(a, b))] for a, b in edges)
        assert total == pytest.approx(ref, rel=1e-12, abs=1e-12)
        if v > 1:
            a, b = zip(*edges)
            adj = coo_matrix((np.ones(v - 1), (a, b)), shape=(v, v))
            assert connected_components(adj, directed=False)[0] == 1
            # depth is the hop distance to the root; the centre root minimises the largest depth
            hops = shortest_path(adj, directed=False, unweighted=True)
            root_k = int((tree.parent_index[k] == -1).nonzero())
            assert tree.depth[k].tolist() == hops[root_k].astype(int).tolist()
            if root == "centre":
                assert int(tree.depth[k].max()) == math.ceil(hops.max() / 2)
            else:
                assert root_k == 0
    # level layout: nodes sorted by depth, parents one level up
    offs = tree.level_offsets
    assert offs[0] == 0 and offs[1] == n and offs[-1] == n * v
    depth_sorted = tree.depth.flatten()[tree.order]
    for d in range(len(offs) - 1):
        assert (depth_sorted[offs[d]:offs[d + 1]] == d).all()
    assert (depth_sorted[tree.parent[n:]] == depth_sorted[n:] - 1).all()


def test_grid_mst_ties_give_a_minimum_spanning_tree():
    # quantised guide: many equal costs, including zeros (scipy ignores 0 entries, so shift by +1)
    g = torch.Generator().manual_seed(3)
    guide = torch.randint(0, 3, (3, 1, 10, 13), generator=g).double()
    tree = grid_mst(guide)
    for k in range(3):
        us, vs, cs = _grid_graph(guide[k].numpy())
        ref = minimum_spanning_tree(coo_matrix((cs + 1.0, (us, vs)), shape=(130, 130))).sum() - 129
        cost = {(min(a, b), max(a, b)): cc for a, b, cc in zip(us.tolist(), vs.tolist(), cs.tolist())}
        edges = _tree_edges(tree, k)
        a, b = zip(*edges)
        assert connected_components(coo_matrix((np.ones(129), (a, b)), shape=(130, 130)), directed=False)[0] == 1
        assert sum(cost[(min(a, b), max(a, b))] for a, b in edges) == pytest.approx(ref, abs=1e-9)


def test_grid_mst_rejects_bad_input():
    with pytest.raises(ValueError):
        grid_mst(torch.rand(3, 4, 4))
    with pytest.raises(ValueError):
        grid_mst(torch.rand(1, 1, 4, 4), root="leaf")


# -------------------------------------------------------------------------- tree filter


def _brute_force_filter(x: torch.Tensor, guide: torch.Tensor, tree: GridTree, sigma: float) -> torch.Tensor:
    """``out_i = sum_j S(i,j) x_j / sum_j S(i,j)`` with S built from explicit tree-path products."""
    n, c, h, w = x.shape
    v = h * w
    out = torch.empty_like(x)
    for k in range(n):
        gk = guide[k].reshape(guide.shape[1], v)
        nbrs: dict[int, list[tuple[int, float]]] = {i: [] for i in range(v)}
        for a, b in _tree_edges(tree, k):
            wab = math.exp(-float(((gk[:, a] - gk[:, b]) ** 2).sum()) / sigma)
            nbrs[a].append((b, wab))
            nbrs[b].append((a, wab))
        s = torch.zeros(v, v, dtype=x.dtype)
        for i in range(v):  # path products from i by DFS
            stack, seen = [(i, 1.0)], {i}
            while stack:
                node, prod = stack.pop()
                s[i, node] = prod
                for nb, wab in nbrs[node]:
                    if nb not in seen:
                        seen.add(nb)
                        stack.append((nb, prod * wab))
        xk = x[k].reshape(c, v)
        out[k] = ((xk @ s.T) / s.sum(dim=1)).reshape(c, h, w)
    return out


@pytest.mark.parametrize("h,w,root", [(4, 5, "centre"), (6, 3, "corner"), (1, 7, "centre")])
def test_tree_filter_equals_brute_force(h, w, root):
    g = torch.Generator().manual_seed(h * 7 + w)
    guide = torch.rand(2, 3, h, w, generator=g, dtype=torch.float64)
    x = torch.randn(2, 4, h, w, generator=g, dtype=torch.float64)
    tree = grid_mst(guide, root=root)
    for sigma in (0.3, 2.0):
        out = tree_filter(x, guide, tree, sigma)
        assert out.dtype == torch.float64 and out.shape == x.shape
        assert torch.allclose(out, _brute_force_filter(x, guide, tree, sigma), atol=1e-10)
    out32 = tree_filter(x.float(), guide.float(), tree, 0.3)
    assert out32.dtype == torch.float32
    assert torch.allclose(out32.double(), _brute_force_filter(x, guide, tree, 0.3), atol=1e-5)


def test_tree_filter_with_other_guide_and_default_tree():
    # affinities from a guide other than the tree's (BoxLevelSet passes the tree's own guide, but allowed)
    g = torch.Generator().manual_seed(11)
    guide = torch.rand(2, 2, 5, 4, generator=g, dtype=torch.float64)
    other = torch.rand(2, 5, 5, 4, generator=g, dtype=torch.float64)
    x = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    tree = grid_mst(guide)
    assert torch.allclose(tree_filter(x, other, tree, 1.0), _brute_force_filter(x, other, tree, 1.0), atol=1e-10)
    assert torch.allclose(tree_filter(x, guide, None, 1.0), tree_filter(x, guide, tree, 1.0), atol=1e-12)


def test_tree_filter_im_inds_shares_image_trees():
    g = torch.Generator().manual_seed(5)
    guide = torch.rand(3, 3, 6, 7, generator=g, dtype=torch.float64)
    tree = grid_mst(guide)
    im_inds = torch.tensor([2, 0, 2, 2, 0])  # image 1 has none
    x = torch.randn(5, 2, 6, 7, generator=g, dtype=torch.float64)
    out = tree_filter(x, guide, tree, 0.5, im_inds=im_inds)
    per_instance = tree_filter(x, guide[im_inds], grid_mst(guide[im_inds]), 0.5)
    assert torch.allclose(out, per_instance, atol=1e-12)
    assert tree_filter(x[:0], guide, tree, 0.5, im_inds=im_inds[:0]).shape == (0, 2, 6, 7)
    with pytest.raises(ValueError):
        tree_filter(x, guide, tree, 0.5, im_inds=torch.tensor([0, 1, 2, 3, 0]))
    with pytest.raises(ValueError):
        tree_filter(x, guide, tree, 0.5)  # 5 maps, 3 graphs


def test_tree_filter_gradcheck_x_and_guide():
    g = torch.Generator().manual_seed(2)
    guide = torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64)
    tree = grid_mst(guide)
    x = torch.randn(2, 2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    gd = guide.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: tree_filter(a, guide, tree, 0.5), (x,))
    assert torch.autograd.gradcheck(lambda a, b: tree_filter(a, b, tree, 0.5, guide_grad=True), (x, gd))
    # with im_inds: gradient reaches the shared per-image guide from every instance
    im_inds = torch.tensor([1, 0, 1])
    xi = torch.randn(3, 1, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: tree_filter(a, b, tree, 0.5, guide_grad=True, im_inds=im_inds),
                                    (xi, gd))
    # no guide gradient unless asked
    tree_filter(x, gd, tree, 0.5).sum().backward()
    assert gd.grad is None and x.grad is not None


def test_tree_filter_constant_input_unchanged():
    g = torch.Generator().manual_seed(9)
    guide = torch.rand(3, 3, 9, 11, generator=g)
    x = torch.full((3, 2, 9, 11), 0.7)
    x[:, 1] = -2.5
    out = tree_filter(x, guide, grid_mst(guide), 0.02)
    assert torch.allclose(out, x, atol=1e-6)


def test_tree_filter_does_not_leak_across_strong_edge():
    # left half dark, right half bright (plus small noise); x is 1 on the left only
    g = torch.Generator().manual_seed(4)
    h, w = 12, 16
    guide = torch.zeros(1, 3, h, w)
    guide[..., w // 2:] = 1.0
    guide = guide + 0.01 * torch.rand(1, 3, h, w, generator=g)
    x = torch.zeros(1, 1, h, w)
    x[..., : w // 2] = 1.0
    tree = grid_mst(guide)
    # the MST crosses the boundary exactly once
    col = torch.arange(h * w) % w
    par = tree.parent_index[0]
    child_side = col >= w // 2
    parent_side = col[par.clamp(min=0)] >= w // 2
    assert int(((child_side != parent_side) & (par >= 0)).sum()) == 1
    out = tree_filter(x, guide, tree, 0.02)
    assert out[..., : w // 2].min() > 0.999
    assert out[..., w // 2:].max() < 1e-3
    # a flat guide instead spreads the mass everywhere
    flat = tree_filter(x, torch.zeros_like(guide), grid_mst(torch.zeros_like(guide)), 0.02)
    assert torch.allclose(flat, torch.full_like(flat, 0.5), atol=1e-5)


def test_tree_edge_affinity_roots_zero_and_range():
    guide = torch.rand(2, 3, 5, 6)
    tree = grid_mst(guide)
    w = tree_edge_affinity(guide, tree, 0.1)
    assert w.shape == (60,)
    assert (w[:2] == 0).all() and (w[2:] > 0).all() and (w <= 1).all()
