import pytest
import torch

from sentcode.nn.rvq import ResidualVQ

DIM, LEVELS, V = 16, 3, 32


def mixture(n=2000, clusters=24, seed=0, offset=0.0):
    """Samples from one fixed Gaussian mixture; ``seed`` picks the samples, not the mixture."""
    gen = torch.Generator().manual_seed(1234)
    centers = torch.randn(clusters, DIM, generator=gen) * 4.0
    weights = torch.rand(clusters, generator=gen) + 0.2
    gen.manual_seed(seed)
    which = torch.multinomial(weights, n, replacement=True, generator=gen)
    return centers[which] + 0.5 * torch.randn(n, DIM, generator=gen) + offset


@pytest.fixture(scope="module")
def data():
    return mixture()


@pytest.fixture(scope="module")
def fitted(data):
    rvq = ResidualVQ(DIM, LEVELS, V)
    rvq.fit(data, iters=10, seed=0)
    return rvq.eval()


def test_decode_is_exact_sum_of_centroids(fitted, data):
    # Regression for residual renormalisation between levels: decoding must be the plain sum.
    codes = fitted.encode(data)
    assert codes.shape == (len(data), LEVELS) and codes.dtype == torch.int64
    manual = fitted.books[0].embed[codes[:, 0]]
    for level in range(1, LEVELS):
        manual = manual + fitted.books[level].embed[codes[:, level]]
    decoded = fitted.decode(codes)
    assert torch.equal(decoded, manual)
    quantized, fwd_codes, _ = fitted(data)
    assert torch.equal(fwd_codes, codes)
    assert torch.equal(quantized, decoded)
    # The last residual is what the sum misses.
    r = data.clone()
    for level in range(LEVELS):
        r = r - fitted.books[level].embed[codes[:, level]]
    torch.testing.assert_close(data - decoded, r, atol=1e-4, rtol=0)


def test_error_falls_with_every_level(fitted):
    held_out = mixture(n=500, seed=1)
    report = fitted.report(held_out)
    mses = [row["mse"] for row in report]
    assert all(b <= a for a, b in zip(mses, mses[1:])), mses
    assert mses[-1] < 0.7 * mses[0]
    energies = [row["residual_energy"] for row in report]
    assert all(b <= a for a, b in zip(energies, energies[1:])) and energies[-1] < 0.1
    # Prefix decoding is the coarse approximation the report measures.
    codes = fitted.encode(held_out)
    mse0 = torch.nn.functional.mse_loss(fitted.decode(codes[:, :1]), held_out).item()
    assert mse0 == pytest.approx(mses[0], rel=1e-5)


def test_standard_normalisation_decodes_to_original_space():
    data = mixture(n=1500, offset=100.0)
    rvq = ResidualVQ(DIM, LEVELS, V, normalize="standard")
    rvq.fit(data, iters=5)
    rvq.eval()
    assert rvq.mean.mean().item() == pytest.approx(100.0, abs=2.0)
    recon = rvq.decode(rvq.encode(data))
    rel = (recon - data).pow(2).mean() / (data - data.mean(0)).pow(2).mean()
    assert rel < 0.1
    assert (recon.mean() - 100.0).abs() < 2.0
    quantized, _, _ = rvq(data)
    assert torch.equal(quantized, recon)


def test_codebooks_are_buffers_without_gradient_and_float32_under_autocast(data):
    rvq = ResidualVQ(DIM, LEVELS, V)
    rvq.fit(data[:500], iters=2)
    assert list(rvq.parameters()) == []
    names = dict(rvq.named_buffers())
    assert {"books.0.embed", "books.0.cluster_size", "books.0.embed_sum"} <= names.keys()
    rvq.train()
    proj = torch.nn.Linear(DIM, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = proj(data[:256])
        assert x.dtype == torch.bfloat16
        quantized, codes, loss = rvq(x)
    assert quantized.dtype == torch.bfloat16 and loss.dtype == torch.float32
    (quantized.float().sum() + loss).backward()
    assert proj.weight.grad is not None and torch.isfinite(proj.weight.grad).all()
    for buf in rvq.buffers():
        assert buf.grad is None and not buf.requires_grad
    for book in rvq.books:
        for buf in (book.embed, book.cluster_size, book.embed_sum):
            assert buf.dtype == torch.float32 and torch.isfinite(buf).all()
    rvq.to(torch.bfloat16)
    assert all(b.dtype == torch.float32 for b in rvq.buffers() if b.is_floating_point())


def test_straight_through_gradient_is_identity(fitted, data):
    x = data[:64].clone().requires_grad_(True)
    quantized, _, _ = fitted(x)
    quantized.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_training_forward_and_encode_assign_the_same_codes(data):
    rvq = ResidualVQ(DIM, LEVELS, V)
    rvq.fit(data, iters=3)
    x = data[:300]
    expected = rvq.eval().encode(x)
    rvq.train()
    _, train_codes, _ = rvq(x)
    assert torch.equal(train_codes, expected)
    # That forward moved the EMA codebooks: the next assignment may differ, and must again agree.
    _, again, _ = rvq.eval()(x)
    assert torch.equal(again, rvq.encode(x))


def test_dead_codes_are_restarted(data):
    torch.manual_seed(0)
    rvq = ResidualVQ(DIM, LEVELS, V, decay=0.8)
    rvq.fit(data, iters=3)
    with torch.no_grad():
        rvq.books[0].embed[V // 2 :] = 1000.0 + torch.randn(V - V // 2, DIM)
        rvq.books[0].embed_sum.copy_(rvq.books[0].embed * rvq.books[0].cluster_size[:, None])
    before = rvq.report(data)[0]["used"]
    assert before <= 0.5
    rvq.train()
    for step in range(50):
        rvq(data[(step * 256) % 1744 :][:256])
    after = rvq.report(data)[0]["used"]
    assert after > before + 0.25
    assert rvq.books[0].embed.abs().max() < 100.0


def test_first_training_batch_initialises_codebooks(data):
    torch.manual_seed(0)
    rvq = ResidualVQ(DIM, LEVELS, V, normalize="standard").train()
    rvq(data[:512])
    assert all(bool(b.initialized) for b in rvq.books) and bool(rvq.norm_ready)
    assert rvq.report(data)[-1]["residual_energy"] < 0.2


def test_kmeanspp_beats_random_init_and_fit_is_deterministic(data):
    def fit_mse(init, seed):
        rvq = ResidualVQ(DIM, 1, V)
        return rvq.fit(data, iters=2, seed=seed, init=init)[0]["mse"]

    pp = sum(fit_mse("kmeans++", s) for s in range(3))
    rnd = sum(fit_mse("random", s) for s in range(3))
    assert pp < rnd

    a, b = ResidualVQ(DIM, LEVELS, V), ResidualVQ(DIM, LEVELS, V)
    stats_a = a.fit(data, iters=3, seed=7)
    stats_b = b.fit(data, iters=3, seed=7, batch=300)
    for sa, sb in zip(stats_a, stats_b):
        assert sa == pytest.approx(sb)
    for ba, bb in zip(a.books, b.books):
        assert torch.equal(ba.embed, bb.embed)


def test_fit_with_fewer_rows_than_codes():
    data = torch.randn(10, DIM)
    rvq = ResidualVQ(DIM, 2, [V, 8])
    stats = rvq.fit(torch.cat([data, data]), iters=3)
    assert len(stats) == 2 and 0 < stats[0]["used"] <= 10 / V
    assert torch.isfinite(rvq.books[0].embed).all()
    rvq.train()(data)  # dead codes restart from a tiny batch without error
    assert rvq.decode(rvq.encode(data)).shape == (10, DIM)


def test_report_is_sane(fitted, data):
    report = fitted.report(data)
    assert len(report) == LEVELS
    for row in report:
        assert -1.0 <= row["cosine"] <= 1.0
        assert 0.0 < row["used"] <= 1.0
        assert 1.0 <= row["perplexity"] <= V + 1e-6
        assert row["dead"] == round((1 - row["used"]) * V)
    assert report[-1]["cosine"] > 0.95


def test_shapes_and_bad_codes(fitted, data):
    x = data[:24].reshape(2, 3, 4, DIM)
    quantized, codes, loss = fitted(x)
    assert quantized.shape == x.shape and codes.shape == (2, 3, 4, LEVELS) and loss.dim() == 0
    assert fitted.decode(codes).shape == x.shape
    with pytest.raises(ValueError, match="last dimension 16"):
        fitted.encode(torch.zeros(3, DIM + 1))
    with pytest.raises(ValueError, match=r"level 1 codes must be in \[0, 32\)"):
        fitted.decode(torch.tensor([[0, V, 0]]))


def test_state_dict_round_trip_and_mismatch(fitted, data):
    state = fitted.state_dict()
    clone = ResidualVQ(DIM, LEVELS, V)
    clone.load_state_dict(state)
    clone.eval()
    assert torch.equal(clone.encode(data), fitted.encode(data))
    assert torch.equal(clone.books[1].cluster_size, fitted.books[1].cluster_size)

    with pytest.raises(ValueError, match=r"expected 3 codebooks.*\(64, 16\).*found 3.*\(32, 16\)"):
        ResidualVQ(DIM, LEVELS, 2 * V).load_state_dict(state)
    with pytest.raises(ValueError, match="expected 2 codebooks.*found 3"):
        ResidualVQ(DIM, 2, V).load_state_dict(state)
    with pytest.raises(ValueError, match="expected 4 codebooks.*found 3"):
        ResidualVQ(DIM, 4, V).load_state_dict(state)
    # Also when the quantizer sits inside a bigger model.
    outer = torch.nn.Module()
    outer.rvq = ResidualVQ(DIM, LEVELS, 2 * V)
    with pytest.raises(ValueError, match="ResidualVQ state does not match"):
        outer.load_state_dict({f"rvq.{k}": v for k, v in state.items()})


def test_commitment_in_the_input_space_does_not_grow_as_the_spread_shrinks():
    """The mechanism behind collapsed autoencoder codebooks: with standardised inputs, a commitment loss taken in
    the standardised space pulls the encoder with a force that grows as 1 / spread, so a shrinking spread pulls
    harder; taken in the input's own space (the VQ-VAE form) it does not."""
    grads = {}
    for space in ("z", "input"):
        for spread in (1e-1, 1e-3):
            torch.manual_seed(0)
            vq = ResidualVQ(8, 1, 16, normalize="running", commit_space=space).train()
            x = (3.0 + spread * torch.randn(256, 8)).requires_grad_(True)
            vq(x.detach())  # statistics and codebook from this data
            _, _, loss = vq(x)
            loss.backward()
            grads[space, spread] = float(x.grad.norm())
    assert grads["z", 1e-3] / grads["z", 1e-1] > 50  # ~ 1 / spread: a smaller spread is pulled harder
    assert grads["input", 1e-3] / grads["input", 1e-1] < 0.05  # ~ spread: the pull fades with the spread
    with pytest.raises(ValueError, match="commit_space"):
        ResidualVQ(8, 1, 16, commit_space="sideways")
