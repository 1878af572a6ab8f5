"""VQ building blocks: k-means op, sub-vector layout, code packing, VQ layers, the search, the pipeline."""

import math

import pytest
import torch
import torch.nn.functional as F

from vmq.errors import VmqError
from vmq.ops.kmeans import assign, assign_ref, fused_available, kmeans, kmeans_update_ref, nearest_k, update_centroids
from vmq.ops.linear import vq_dequantize_ref, vq_linear_ref
from vmq.pack.bits import pack_unsigned, packed_nbytes, unpack_unsigned
from vmq.vq.codebook import Layout, importance, init_codebook
from vmq.vq.convex import ConvexVQLinear
from vmq.vq.incremental import confirm, stage_lengths
from vmq.layers import VQLinear
from vmq.vq.recipe import Codebook, VQStage


def brute_dist(x, c, w=None):
    w = torch.ones_like(x) if w is None else w
    return (w[:, None, :] * (x[:, None, :] - c[None]) ** 2).sum(-1)


@pytest.mark.parametrize("weighted", [False, True])
def test_assign_and_nearest_k_match_brute_force_in_any_chunking(weighted):
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(300, 4, generator=g, dtype=torch.float64), torch.randn(37, 4, generator=g, dtype=torch.float64)
    w = torch.rand(300, 4, generator=g, dtype=torch.float64) if weighted else None
    d = brute_dist(x, c, w)
    for chunk in (1, 7, 1000):
        codes, dist = assign(x, c, w, chunk=chunk, return_dist=True)
        assert torch.equal(codes, d.argmin(1))
        assert torch.allclose(dist, d.min(1).values, atol=1e-10)
        idx, dk = nearest_k(x, c, 5, w, chunk=chunk)
        ref = d.topk(5, dim=1, largest=False)
        assert torch.equal(idx, ref.indices) and torch.allclose(dk, ref.values, atol=1e-10)


def test_weighted_kmeans_lowers_its_objective_and_is_deterministic():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(200, 2, generator=g) + off for off in (torch.tensor([5.0, 0]), torch.tensor([-5.0, 3]))])
    w = torch.rand(400, 2, generator=g) + 0.1

    def objective(c, codes):
        return (w * (x - c[codes]) ** 2).sum()

    c0, codes0 = kmeans(x, 8, iterations=0, w=w, seed=3)
    c1, codes1 = kmeans(x, 8, iterations=30, w=w, seed=3)
    assert objective(c1, codes1) < objective(c0, codes0)
    c2, codes2 = kmeans(x, 8, iterations=30, w=w, seed=3)
    assert torch.equal(c1, c2) and torch.equal(codes1, codes2)
    # a centroid is the weighted mean of its points, coordinate by coordinate
    k = int(codes1[0])
    members = codes1 == k
    assert torch.allclose(c1[k], (w[members] * x[members]).sum(0) / w[members].sum(0), atol=1e-5)
    with pytest.raises(ValueError, match="1..400"):
        kmeans(x, 401)


BACKENDS = ["ref", pytest.param("cpu", marks=pytest.mark.skipif(
    not fused_available(), reason="the fused k-means kernels do not build here (C++ compiler and ninja)"))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_centroids_keeps_an_empty_cluster(backend):
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    old = torch.tensor([[0.5, 0.5], [9.0, 9.0]])
    new = update_centroids(x, torch.tensor([0, 0]), old, backend=backend)
    assert torch.equal(new[1], old[1]) and torch.allclose(new[0], torch.tensor([0.5, 0.5]))
    w = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # the second coordinate has no weight: it stays
    new = update_centroids(x, torch.tensor([0, 0]), old, w, backend=backend)
    assert torch.allclose(new[0], torch.tensor([0.75, 0.5])) and torch.equal(new[1], old[1])


@pytest.mark.skipif(not fused_available(), reason="the fused k-means kernels do not build here")
@pytest.mark.parametrize("d", [1, 2, 3, 4, 5, 6, 7, 8, 16])
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_kmeans_kernels_match_their_reference(d, weighted):
    g = torch.Generator().manual_seed(d)
    # ragged tiles; K below 8, not a multiple of 8, over one block of 256
    for n, k in ((203, 37), (61, 300), (9, 1), (30, 5)):
        x, c = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
        w = torch.rand(n, d, generator=g) if weighted else None
        exact = brute_dist(x.double(), c.double(), None if w is None else w.double())
        best = exact.min(1).values
        codes, dist = assign(x, c, w, return_dist=True, backend="cpu")
        chosen = exact.gather(1, codes[:, None]).squeeze(1)
        assert (chosen - best <= 1e-5 * (1 + best)).all()  # nearest up to fp32 rounding
        assert (codes == exact.argmin(1)).float().mean() > 0.98
        assert torch.allclose(dist.double(), best, atol=1e-4, rtol=1e-4)
        ref = kmeans_update_ref(x.double(), None if w is None else w.double(), codes, c.double())
        assert torch.allclose(update_centroids(x, codes, c, w, backend="cpu").double(), ref, atol=1e-5)


@pytest.mark.skipif(not fused_available(), reason="the fused k-means kernels do not build here")
def test_fused_assign_breaks_ties_low_and_ignores_thread_count():
    c = torch.tensor([[1.0, 2.0], [0.0, 0.0], [1.0, 2.0], [5.0, 5.0]] * 70)  # every centroid four times or more
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0], [5.0, 5.0], [3.0, 3.5]]).repeat(50, 1)
    codes = assign(x, c, backend="cpu")
    assert torch.equal(codes, assign_ref(x, c)) and set(codes.tolist()) == {0, 1, 3}
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(5000, 4, generator=g), torch.randn(500, 4, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = assign(x, c, return_dist=True, backend="cpu")
        torch.set_num_threads(2)
        two = assign(x, c, return_dist=True, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    with pytest.raises(RuntimeError, match="out of range"):
        update_centroids(x, torch.full((5000,), 500), c, backend="cpu")
    # a point's result does not depend on where it falls in the tiling (a full tile or the tail)
    for d in (2, 4, 5, 8):
        xs, cs = torch.randn(203, d, generator=g), torch.randn(37, d, generator=g)
        full = assign(xs, cs, return_dist=True, backend="cpu")
        for cut in (202, 201, 199):
            part = assign(xs[:cut], cs, return_dist=True, backend="cpu")
            assert torch.equal(part[0], full[0][:cut]) and torch.equal(part[1], full[1][:cut])


@pytest.mark.skipif(not fused_available(), reason="the fused k-means kernels do not build here")
def test_fused_kmeans_takes_what_the_reference_takes():
    g = torch.Generator().manual_seed(5)
    x, c = torch.randn(8, 40, generator=g).t(), torch.randn(6, 8, generator=g)  # non-contiguous points
    w = torch.rand(8, generator=g)  # one weight per coordinate, for every point
    codes = assign(x, c, w, backend="cpu")
    assert torch.equal(codes, assign(x.contiguous(), c, w.expand(40, 8).contiguous(), backend="cpu"))
    assert torch.equal(codes, assign_ref(x.double(), c.double(), w.double()))
    new = update_centroids(x, codes.to(torch.int32), c, w, backend="cpu")
    assert torch.allclose(new.double(), kmeans_update_ref(x.double(), w.double(), codes, c.double()), atol=1e-6)
    empty = torch.empty(0, 8)
    assert assign(empty, c, backend="cpu").shape == (0,)
    assert torch.equal(update_centroids(empty, torch.empty(0, dtype=torch.int64), c, backend="cpu"), c)
    with pytest.raises(ValueError, match="NaN"):
        assign(torch.full((3, 8), float("nan")), c, backend="cpu")


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8, 11, 12, 16])
def test_pack_unsigned_roundtrip(bits):
    v = torch.randint(0, 2 ** bits, (37,))
    packed = pack_unsigned(v, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(37, bits)
    assert torch.equal(unpack_unsigned(packed, bits, 37), v)
    with pytest.raises(ValueError):
        pack_unsigned(torch.tensor([2 ** bits]), bits)


def test_layout_split_merge_pads_the_input_dimension():
    w = torch.randn(6, 10)
    lay = Layout.of(w, Codebook(dim=4, size=4, rows_per_group=4))
    assert (lay.cols, lay.groups, lay.num_subvectors) == (3, 2, 18)
    v = lay.split(w)
    assert v.shape == (18, 4) and torch.equal(v[2, 2:], torch.zeros(2)) and torch.equal(v[0], w[0, :4])
    assert torch.equal(lay.merge(v), w)
    assert lay.group_of(torch.device("cpu")).tolist() == [0] * 12 + [1] * 6
    imp = importance(lay, torch.arange(1.0, 11.0), None, torch.device("cpu"))
    assert torch.equal(imp[2, 2:], torch.zeros(2)) and imp[0, 0] < imp[1, 0]


def test_vq_dequantize_ref_and_vq_linear():
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(2, 8, 3, generator=g).half()
    codes = torch.randint(0, 8, (5, 3), generator=g)
    scale = torch.rand(5, generator=g).half() + 0.5
    w = vq_dequantize_ref(codes, codebook, 7, rows_per_group=3, scale=scale)
    assert w.shape == (5, 7)
    for n in range(5):
        row = torch.cat([codebook[n // 3, codes[n, j]].float() for j in range(3)])[:7] * scale[n].float()
        assert torch.equal(w[n], row)
    x = torch.randn(2, 4, 7, generator=g)
    bias = torch.randn(5, generator=g)
    assert torch.allclose(vq_linear_ref(x, codes, codebook, 3, scale, bias), F.linear(x, w, bias), atol=1e-6)
    with pytest.raises(ValueError, match="codebooks"):
        vq_dequantize_ref(codes, codebook, 7, rows_per_group=5)
    with pytest.raises(ValueError, match="cover"):
        vq_dequantize_ref(codes, codebook, 10)


def _layer(out=24, inp=16, cb=Codebook(dim=2, size=16), act=None, tokens=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(inp, out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out, inp, generator=g) * 0.1)
    h = torch.rand(inp, generator=g) + 0.5
    layout, codebook, codes, scale, imp = init_codebook("layer", lin.weight, cb, 20, h, seed)
    return lin, ConvexVQLinear(lin, layout, codebook, codes, scale, imp, act, tokens)


def test_convex_layer_fit_beats_nearest_codeword_and_freezes_exactly():
    lin, q = _layer(cb=Codebook(dim=2, size=16, row_scale=True))
    w_fp = lin.weight.detach()
    hard_err = (q.weight() - w_fp).pow(2).sum()
    q.start_search(4)
    soft_err = (q.weight() - w_fp).pow(2).sum()
    assert soft_err < 0.5 * hard_err  # the convex hulls of 4 neighbours hold the weights far better
    assert not q.confirmed.any()
    confirm({"q": q}, 0.5)
    assert int(q.confirmed.sum()) == math.ceil(0.5 * q.layout.num_subvectors)
    confirm({"q": q}, 1.0)
    assert q.confirmed.all()
    f = q.freeze()
    x = torch.randn(3, 5, 16)
    assert torch.allclose(f(x), q(x), atol=2e-3 * q(x).abs().max())  # only the fp16 codebook and scale differ
    assert f.storage_bits()["codes"] == 24 * 8 * 4


def test_confirmation_picks_the_most_confident():
    _, q = _layer()
    q.start_search(4)
    with torch.no_grad():
        q.logits.zero_()
        q.logits[3, 2] = 10.0
        q.logits[7, 1] = 5.0
    confirm({"q": q}, 2 / q.layout.num_subvectors)
    assert q.confirmed.nonzero().squeeze(1).tolist() == [3, 7]
    assert int(q.code[3]) == int(q.candidates[3, 2]) and int(q.code[7]) == int(q.candidates[7, 1])


def test_stage_lengths():
    assert stage_lengths(10, 4) == [3, 3, 2, 2] and sum(stage_lengths(301, 5)) == 301


def test_codebook_larger_than_subvectors_is_refused():
    lin = torch.nn.Linear(6, 4)
    with pytest.raises(VmqError, match="exceeds its 8 sub-vectors"):
        init_codebook("l", lin.weight, Codebook(dim=4, size=16), 5, None, 0)


def test_recipe_rejects_impossible_settings():
    from vmq.recipe import load_recipe
    from vmq.vq.recipe import VQRecipe

    for sets, msg in ((["vq.codebook.size=12"], "power of two"), (["vq.codebook.size=131072"], "at most"),
                      (["vq.codebook.dim=0"], "greater than or equal to 1"),
                      (["vq.search.candidates=32"], "exceeds codebook.size"),
                      (["vq.confirm.schedule=[0.5, 0.4, 1.0]"], "increase"),
                      (["vq.confirm.schedule=[0.5, 0.9]"], "end at 1.0"), (["vq.codebok.size=16"], "codebook")):
        with pytest.raises(VmqError, match=msg):
            load_recipe(None, VQRecipe, sets)
    r = load_recipe(None, VQRecipe, ["vq.codebook.dim=4", "vq.codebook.size=256"])
    assert r.vq.codebook.bits_per_weight == 2.0
    # what the method checks of its recipe block
    from vmq.compress import method_for

    for sets, msg in ((["vq.search.iterations=5"], r"search.iterations \(5\) must be at least the number of "
                                                  r"confirmation stages plus one \(6\)"),
                      (["vq.search.iterations=2", "vq.confirm.schedule=[0.5, 1.0]"], "plus one \\(3\\)"),
                      (["vq.method=kmeanz"], "unknown method 'kmeanz'")):
        with pytest.raises(VmqError, match=msg):
            method_for("vq", load_recipe(None, VQRecipe, sets).vq)
    method_for("vq", load_recipe(None, VQRecipe, ["vq.search.iterations=6"]).vq)  # exactly enough
    method_for("vq", load_recipe(None, VQRecipe, ["vq.method=kmeans", "vq.search.iterations=2"]).vq)  # no search


def test_targets_whose_codebook_cannot_fit_are_refused_before_any_work(tiny):
    from vmq.compress import method_for
    from vmq.models import family_of

    model = tiny[0]
    fam = family_of(model)
    stage = VQStage(method="kmeans", codebook=Codebook(dim=4, size=256))
    assert stage.targets is None  # the family's default targets
    with pytest.raises(VmqError, match=r"layers.0.mixer.dt_proj: codebook.size 256 exceeds its 96 sub-vectors"):
        method_for("vq", stage).targets(model, fam)
    ok = method_for("vq", VQStage(method="kmeans", codebook=Codebook(dim=2, size=16))).targets(model, fam)
    assert len(ok) == 12 and all(".mixer." in t for t in ok)


@pytest.fixture(scope="module")
def tiny():
    import timm

    import vmq.models  # noqa: F401
    from vmq.calib import collect_stats

    torch.manual_seed(0)
    model = timm.create_model("test_vim").eval()
    model.vmq_name = "test_vim"
    images = torch.randn(24, 3, 32, 32)
    with torch.no_grad():
        stats = collect_stats(model, images, 8)
    return model, images, stats


@pytest.mark.parametrize("method,act", [("kmeans", None), ("vimvq", None), ("vimvq", 8)])
def test_vq_model_end_to_end_and_packed_roundtrip(tiny, tmp_path, method, act):
    import copy

    from vmq.compress import compress_model, method_for
    from vmq.pack.format import load_packed, save_packed

    model, images, stats = tiny
    model = copy.deepcopy(model)
    with torch.no_grad():
        ref = model(images)
    stage = VQStage(method=method, codebook=Codebook(dim=2, size=16, rows_per_group=48),
                    search={"iterations": 10, "batch_size": 8},
                    input_activations=None if act is None else {"num_bits": act})
    with torch.no_grad():
        reports = compress_model(model, method_for("vq", stage), images, stats, batch_size=8, seed=0)
    assert len(reports) == 12 and all(isinstance(m, VQLinear) for n, m in model.named_modules()
                                      if n.endswith(("in_proj", "x_proj", "x_proj_b", "out_proj")))
    for r in reports:  # 4-bit codes per 2 weights; a padded input dimension costs its padding
        inp = dict(model.named_modules())[r.name].in_features
        assert r.code_bits_per_weight == pytest.approx(math.ceil(inp / 2) * 4 / inp, abs=1e-4)
        assert r.bits_per_weight > r.code_bits_per_weight
    if method == "vimvq":
        assert all(r.loss_final is not None for r in reports)
    with torch.no_grad():
        out = model(images)
    assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.8
    path = tmp_path / "vq.safetensors"
    save_packed(model, path, {"vq": stage.model_dump(mode="json")}, {})
    loaded, meta = load_packed(path)
    assert {s["kind"] for s in meta["layers"].values()} == {"vq"}
    with torch.no_grad():
        assert torch.equal(loaded(images), out)


def test_vimvq_search_lowers_the_block_loss(tiny):
    import copy

    from vmq.compress import compress_model, method_for

    model, images, stats = tiny
    stage = VQStage(method="vimvq", codebook=Codebook(dim=4, size=16), search={"iterations": 40, "batch_size": 8})
    with torch.no_grad():
        reports = compress_model(copy.deepcopy(model), method_for("vq", stage), images, stats, batch_size=8, seed=0)
    per_block = {r.name.split(".mixer")[0]: (r.loss_kmeans, r.loss_final) for r in reports}
    assert all(after < before for before, after in per_block.values()), per_block


@pytest.mark.parametrize("weighted", [False, True])
def test_fused_kmeans_assignment_matches_its_reference(weighted):
    from vmq.ops.kmeans import assign_ref, fused_available

    if not fused_available():
        pytest.skip("the C++ k-means kernel does not build here (no compiler or ninja)")
    g = torch.Generator().manual_seed(2)
    x, c = torch.randn(3000, 4, generator=g), torch.randn(600, 4, generator=g)  # 600: several centroid blocks
    w = torch.rand(3000, 4, generator=g) if weighted else None
    codes, dist = assign(x, c, w, return_dist=True, backend="cpu")
    ref_codes, ref_dist = assign_ref(x, c, w, return_dist=True)
    assert torch.allclose(dist, ref_dist, atol=1e-4)
    exact = brute_dist(x.double(), c.double(), None if w is None else w.double())
    picked = exact.gather(1, codes[:, None]).squeeze(1)
    assert torch.allclose(picked, exact.min(1).values, atol=1e-4)  # the nearest, up to fp32 rounding
    assert (codes == ref_codes).float().mean() > 0.999


def test_convex_layer_gradients_are_bitwise_repeatable():
    # advanced indexing's backward adds into the codebook with parallel atomics on CPU, so its
    # sums change order from run to run; the layer must gather with index_select instead
    lin, q = _layer(out=256, inp=512, cb=Codebook(dim=2, size=16))
    q.start_search(4)
    q.confirm_indices(torch.arange(0, q.layout.num_subvectors, 2))  # half confirmed, half soft
    x = torch.randn(8, 512, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    grads = set()
    try:
        torch.set_num_threads(2)
        for _ in range(6):
            q.codebook.grad, q.logits.grad = None, None
            q.codebook.requires_grad_(True)
            q(x).square().sum().backward()
            grads.add((q.codebook.grad.numpy().tobytes(), q.logits.grad.numpy().tobytes()))
    finally:
        torch.set_num_threads(threads)
    assert len(grads) == 1
