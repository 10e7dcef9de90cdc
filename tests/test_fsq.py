"""Finite scalar quantization: codes on a fixed grid, decode(codes) is the forward's value, the gradient passes
straight through, bad codes are refused, and the autoencoder trains its compressor through it."""

from __future__ import annotations

import pytest
import torch

from sentcode.nn.fsq import FSQ


@pytest.mark.parametrize("size", [3, 4, 5, 8])
def test_codes_cover_the_grid_and_decode_to_the_forward_value(size):
    f = FSQ(3, size).train()
    x = torch.randn(4000, 3) * 4
    q, codes, loss = f(x)
    assert codes.shape == (4000, 3) and codes.dtype == torch.int64
    assert sorted(codes.unique().tolist()) == list(range(size))  # every value of the grid is reachable
    assert torch.equal(f.decode(codes), q)
    assert torch.equal(f.encode(x), codes)
    assert float(loss) == 0.0  # nothing to commit to
    assert q.abs().max() <= 1.0 + 1e-6


def test_nearby_inputs_share_a_code_and_the_order_is_kept():
    f = FSQ(1, 5)
    x = torch.linspace(-3, 3, 101)[:, None]
    codes = f.encode(x)[:, 0]
    assert torch.all(codes[1:] >= codes[:-1])  # monotone: a grid, not a learned table
    assert codes[0] == 0 and codes[-1] == 4


def test_the_gradient_passes_straight_through_the_rounding():
    f = FSQ(4, 5)
    x = (torch.randn(16, 4) * 0.3).requires_grad_()
    q, _, _ = f(x)
    q.sum().backward()
    # d q / d x is the bound's derivative (tanh' * half / (size // 2)), not the rounding's zero
    expect = (1 - torch.tanh(x.detach()) ** 2) * f.half / (f.size // 2)
    assert torch.allclose(x.grad, expect, atol=1e-6)


def test_bf16_inputs_keep_float32_grid_arithmetic():
    f = FSQ(4, 8).train()
    x = torch.randn(64, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, codes, _ = f(x.bfloat16())
    assert torch.equal(codes, f.encode(x.bfloat16().float()))
    assert f.counts.dtype == torch.float32 and float(f.counts.sum()) > 0


def test_decode_refuses_bad_codes():
    f = FSQ(3, 4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        f.decode(torch.tensor([[0, 4, 1]]))
    with pytest.raises(ValueError, match="codes \\[..., 3\\]"):
        f.decode(torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="integer"):
        f.decode(torch.zeros(2, 3))
    with pytest.raises(ValueError):
        FSQ(3, 2)


def test_the_autoencoder_trains_its_compressor_through_fsq():
    from sentcode.corpus.cutters import Segmenter
    from sentcode.data.segments import build_row, stack_rows
    from sentcode.models.sentence.steplm import StepLM, StepLMModelConfig

    cfg = StepLMModelConfig(d_model=32, n_layer=1, n_head=2, n_kv_head=1, d_plan=32, plan_layers=1, plan_heads=2,
                            plan_kv_heads=1, enc_d_model=16, enc_heads=2, window=16, max_segments=32,
                            max_segment_bytes=16, levels=4, codebook_size=5, quantizer="fsq", code_dropout=0.0,
                            pool="attention", cond_init="normal")
    m = StepLM(cfg).train()
    text = "The Congress met today. It passed three bills, one of them on roads! Nobody listened. " * 2
    seg = Segmenter("space", max_bytes=16)
    x, y, s, n = stack_rows([build_row(seg.cut(text))], "cpu")
    out = m(x, y, s, n, details=True)
    out["render_nats"].backward()
    for name in ("to_code.weight", "pool_query", "enc_embed.weight"):
        g = dict(m.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name
    codes = out["codes"][0, : int(s.max()) + 1]
    assert codes.shape[-1] == 4 and len({tuple(c) for c in codes.tolist()}) > 1  # segments differ at step 0
    assert "code_perplexity_l4" in m.quant.ema_report()


def test_a_bad_quantizer_setting_is_one_clear_error():
    from sentcode.errors import ConfigError
    from sentcode.models.sentence.steplm import StepLMModelConfig

    with pytest.raises(ConfigError, match="model.quantizer must be vq or fsq"):
        StepLMModelConfig(levels=2, quantizer="lfq").validate()
    with pytest.raises(ConfigError, match="at least 3"):
        StepLMModelConfig(levels=2, quantizer="fsq", codebook_size=2).validate()
    assert StepLMModelConfig(levels=6, quantizer="fsq", codebook_size=4).codes_per_segment == 1
    assert StepLMModelConfig(levels=3).codes_per_segment == 3
    # a second level reads one code per level-1 segment: an FSQ tuple is refused with the way out named
    from sentcode.train.steplm import load_steplm_config
    from sentcode.models.hier import HierConfig

    with pytest.raises(ConfigError, match="model.quantizer=vq and model.levels=1"):
        load_steplm_config("hier-tiny", ["model.quantizer=fsq", "model.levels=1", "model.codebook_size=5",
                                         "data.upper_stride=4"], HierConfig)


@pytest.mark.parametrize("mode", ["running", "batch"])
def test_standardised_inputs_with_a_tiny_spread_still_take_many_codes(mode):
    # the autoencoder's measured failure: outputs 0.005 apart around a mean of 0.5 all rounded to one grid point
    torch.manual_seed(0)
    x = 0.5 + 0.005 * torch.randn(2000, 4)
    assert FSQ(4, 5).encode(x).unique().numel() == 1
    f = FSQ(4, 5, normalize=mode).train()
    for _ in range(3):
        _, codes, _ = f(x)
    assert all(codes[:, i].unique().numel() >= 4 for i in range(4))
    f.eval()
    assert torch.equal(f.encode(x), f.encode(x))  # inference reads the running statistics, not the batch
    assert f.encode(x).unique().numel() >= 4
    # the statistics stay float32 under a dtype change, and travel in the state dict
    f.bfloat16()
    assert f.mean.dtype == torch.float32 and f.var.dtype == torch.float32
    g = FSQ(4, 5, normalize=mode)
    g.load_state_dict(f.state_dict())
    assert torch.equal(g.eval().encode(x), f.encode(x))


def test_unknown_normalisation_is_refused():
    with pytest.raises(ValueError, match="normalize"):
        FSQ(3, 5, normalize="layer")
