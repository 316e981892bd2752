import pytest
import torch

from gq import GaussianCodebook, GaussianQuantizer, QuantizerConfig, dequantize, quantize, split_groups
from kernels import nearest_code
from kernels.reference import reference_search

CB = GaussianCodebook(4096, 4)


def latents(b, groups, h, w, seed=0, d=4):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(b, d * groups, h, w, generator=g)
    logvar = torch.rand(b, d * groups, h, w, generator=g) * 6 - 6
    return mu, logvar


@pytest.mark.parametrize("layout", ["interleaved", "contiguous"])
@pytest.mark.parametrize("rule", ["posterior", "mean"])
@pytest.mark.parametrize("groups", [1, 4])
def test_dequantize_of_quantize_is_the_selected_codebook_vectors(layout, rule, groups):
    q = GaussianQuantizer(CB, groups=groups, layout=layout, rule=rule)
    mu, logvar = latents(2, groups, 3, 5)
    idx = q.quantize(mu, logvar)
    assert idx.shape == (2, 3, 5, groups) and idx.dtype == torch.int64
    z = q.dequantize(idx)
    assert z.shape == mu.shape and z.dtype == torch.float32
    # back in group form, every group vector is exactly the codebook row its token names
    assert torch.equal(split_groups(z, groups, layout), CB.vectors[idx])
    # and the tokens are the float64 reference's choice for each group vector
    mu_g = split_groups(mu, groups, layout).reshape(-1, 4)
    lv_g = split_groups(logvar, groups, layout).reshape(-1, 4)
    ref, _ = reference_search(mu_g, lv_g if rule == "posterior" else None, CB.vectors, rule=rule)
    assert torch.equal(idx.reshape(-1), ref)


def test_interleaved_layout_matches_the_notes_channel_example():
    # C = 16, d = 4: interleaved groups are channels [0,4,8,12], [1,5,9,13], ...; contiguous [0..3], ...
    x = torch.arange(16.0).view(1, 16, 1, 1)
    assert split_groups(x, 4, "interleaved")[0, 0, 0].tolist() == [
        [0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]
    ]  # fmt: skip
    assert split_groups(x, 4, "contiguous")[0, 0, 0].tolist() == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]
    ]  # fmt: skip
    # End to end: place codebook rows 11, 22, 33, 44 on the interleaved channels; mean rule finds them.
    targets = [11, 22, 33, 44]
    mu = torch.zeros(1, 16, 1, 1)
    for g, t in enumerate(targets):
        mu[0, [g, g + 4, g + 8, g + 12], 0, 0] = CB.vectors[t]
    q = GaussianQuantizer(CB, groups=4, layout="interleaved", rule="mean")
    assert q.quantize(mu)[0, 0, 0].tolist() == targets
    assert torch.equal(q.dequantize(q.quantize(mu)), mu)
    contiguous = GaussianQuantizer(CB, groups=4, layout="contiguous", rule="mean")
    assert contiguous.quantize(mu)[0, 0, 0].tolist() != targets


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 2, 1), (3, 1, 2), (7, 1, 1), (2, 16, 16)])
def test_any_batch_size(shape):
    b, h, w = shape
    q = GaussianQuantizer(CB, groups=2)
    mu, logvar = latents(b, 2, h, w, seed=b * h * w)
    idx = q.quantize(mu, logvar)
    assert idx.shape == (b, h, w, 2)
    manual = nearest_code(split_groups(mu, 2, "interleaved").reshape(-1, 4),
                          split_groups(logvar, 2, "interleaved").reshape(-1, 4), CB.vectors)  # fmt: skip
    assert torch.equal(idx.reshape(-1), manual)


def test_logvar_is_clamped_to_reference_range():
    q = GaussianQuantizer(CB)
    mu, _ = latents(2, 1, 4, 4)
    low, high = torch.full_like(mu, -30.0), torch.full_like(mu, 20.0)
    assert torch.equal(q.quantize(mu, torch.full_like(mu, -500.0)), q.quantize(mu, low))
    assert torch.equal(q.quantize(mu, torch.full_like(mu, 300.0)), q.quantize(mu, high))


def test_config_round_trip_and_rebuild():
    q = GaussianQuantizer(GaussianCodebook(1024, 8, seed=3, kind="iid"), groups=2, layout="contiguous",
                          rule="mean", beta=0.5)  # fmt: skip
    config = QuantizerConfig.from_dict(q.config.to_dict())
    assert config == q.config and config.channels == 16
    again = GaussianQuantizer.from_config(config)
    assert again.fingerprint == q.fingerprint and torch.equal(again.codes, q.codes)
    assert "codes" not in q.state_dict()  # rebuilt from the recipe, pinned by the fingerprint


def test_functional_and_module_agree_and_errors():
    mu, logvar = latents(2, 1, 3, 3)
    q = GaussianQuantizer(CB)
    assert torch.equal(q.quantize(mu, logvar), quantize(mu, logvar, CB.vectors, 1))
    idx = q.quantize(mu, logvar)
    assert torch.equal(dequantize(idx.int(), CB.vectors), q.dequantize(idx))
    with pytest.raises(ValueError, match="expected mu"):
        q.quantize(torch.zeros(1, 8, 2, 2), torch.zeros(1, 8, 2, 2))
    with pytest.raises(ValueError, match="logvar"):
        q.quantize(mu)
    with pytest.raises(ValueError, match=r"\[0, 4096\)"):
        q.dequantize(torch.full((1, 1, 1, 1), 4096))
    with pytest.raises(TypeError):
        q.dequantize(torch.zeros(1, 1, 1, 1))
    with pytest.raises(ValueError, match="layout"):
        GaussianQuantizer(CB, layout="planar")
    with pytest.raises(ValueError, match="groups"):
        q.quantize(torch.zeros(1, 6, 1, 1), torch.zeros(1, 6, 1, 1))
