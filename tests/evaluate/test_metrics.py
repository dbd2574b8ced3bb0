"""FID and Inception Score: closed forms and parity with torchmetrics / torch-fidelity on the same features."""

import numpy as np
import pytest
import torch

from sd_distill.evaluate.metrics.features import extract_features, images_to_tensor, load_feature_extractor
from sd_distill.evaluate.metrics.fid import feature_statistics, fid_from_features, frechet_distance
from sd_distill.evaluate.metrics.inception import FIDInceptionV3, find_inception_weights, resize_bilinear_tf1
from sd_distill.evaluate.metrics.inception_score import inception_score


class SmallFeatures(torch.nn.Module):
    """A fixed random conv net standing in for Inception: [N, 3, H, W] in [0, 1] -> (pool [N, 12], logits [N, 7])."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 12, 3, stride=2)
        self.fc = torch.nn.Linear(12, 7)

    def features(self, x):
        pool = torch.tanh(self.conv(x)).mean(dim=(2, 3))
        return pool, self.fc(pool) * 3


class Pool(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.features(x)[0]


class Logits(Pool):
    def forward(self, x):
        return self.net.features(x)[1]


def _images(n, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 16, 16, generator=g) * 0.8 + shift).clamp(0, 1)


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0]), np.array([2.0, -1.0])
    s1, s2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    # ||mu1 - mu2||^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2 for commuting (diagonal) covariances
    expected = 8.0 + (1 - 3) ** 2 + (2 - 1) ** 2
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_fid_of_singular_covariances_uses_the_eps_offset_and_stays_finite():
    x = np.random.default_rng(0).normal(size=(5, 10))  # 5 samples in 10-d: rank-deficient covariances
    value = fid_from_features(x, x[::-1] + 0.5)
    assert np.isfinite(value) and value == pytest.approx(10 * 0.25, rel=0.05)


def test_fid_matches_torchmetrics_with_the_same_feature_module():
    from torchmetrics.image.fid import FrechetInceptionDistance

    net = SmallFeatures()
    real, fake = _images(40, 1), _images(30, 2, shift=0.15)
    tm = FrechetInceptionDistance(feature=Pool(net), normalize=True)
    tm.update(real, real=True)
    tm.update(fake, real=False)
    with torch.no_grad():
        ours = fid_from_features(net.features(real)[0].double().numpy(), net.features(fake)[0].double().numpy())
    assert ours == pytest.approx(float(tm.compute()), rel=1e-4)
    assert ours > 0.01


def test_inception_score_matches_torchmetrics_with_the_same_permutation():
    from torchmetrics.image.inception import InceptionScore

    net = SmallFeatures()
    imgs = _images(50, 3)
    tm = InceptionScore(feature=Logits(net), splits=10)  # float input goes to the module unchanged
    tm.update(imgs)
    torch.manual_seed(123)
    tm_mean, tm_std = tm.compute()
    torch.manual_seed(123)
    perm = torch.randperm(50)  # the order torchmetrics drew
    with torch.no_grad():
        mean, std = inception_score(net.features(imgs)[1], splits=10, permutation=perm)
    assert mean == pytest.approx(float(tm_mean), rel=1e-5)
    # the std over splits is ~1.5e-4 here (scores near 1): torchmetrics' fp32 sums leave ~4e-8 of rounding in it
    assert std == pytest.approx(float(tm_std), rel=1e-4, abs=2e-7)


def test_inception_score_bounds_one_for_identical_predictions_and_k_for_confident_uniform_classes():
    assert inception_score(torch.zeros(20, 5), splits=2)[0] == pytest.approx(1.0)
    confident = torch.eye(5).repeat(4, 1) * 50  # each class equally often, each image certain
    mean, std = inception_score(confident, splits=2)
    assert mean == pytest.approx(5.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="splits=10"):
        inception_score(torch.zeros(5, 3), splits=10)


def test_tf1_resize_samples_at_i_times_in_over_out():
    x = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4)
    out = resize_bilinear_tf1(x, 8)
    # source column s = j * 4 / 8 = j / 2, clamped at the last pixel
    assert out[0, 0, 0].tolist() == [0, 0.5, 1, 1.5, 2, 2.5, 3, 3]


@pytest.mark.slow
def test_fid_inception_matches_torch_fidelity_on_the_same_weights(fid_inception_weights):
    tfe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3",
                              reason="torch-fidelity not installed (pip install --no-deps torch-fidelity)")
    theirs = tfe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                             feature_extractor_weights_path=str(fid_inception_weights))
    ours = load_feature_extractor(str(fid_inception_weights))
    x = torch.randint(0, 256, (1, 3, 37, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pool_t, logits_t = theirs(x)
    pool, logits = ours.features(x.float() / 255)
    assert pool.shape == (1, 2048) and logits.shape == (1, 1008)
    torch.testing.assert_close(pool, pool_t, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits, logits_t, atol=1e-5, rtol=1e-4)


def test_inception_weights_are_found_by_name_and_never_downloaded(tmp_path, monkeypatch, fid_inception_weights):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="downloads are never attempted"):
        find_inception_weights()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    target = tmp_path / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    target.write_bytes(fid_inception_weights.read_bytes())
    assert find_inception_weights() == target
    assert isinstance(load_feature_extractor("inception-v3-fid"), FIDInceptionV3)


def test_wrong_state_dict_and_unknown_refs_fail_clearly(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not an FID InceptionV3 state dict"):
        load_feature_extractor(str(bad))
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_feature_extractor(str(tmp_path / "folder"))
    (tmp_path / "folder" / "config.json").write_text('{"_class_name": "os.system"}')
    with pytest.raises(ValueError, match="must live in the sd_distill package"):
        load_feature_extractor(str(tmp_path / "folder"))


def test_model_folder_extractor_is_loaded_by_the_class_its_config_names(tiny_classifier_folder):
    from sd_distill.toy.classifier import ToyAttributeClassifier

    model = load_feature_extractor(str(tiny_classifier_folder))
    assert isinstance(model, ToyAttributeClassifier) and not model.training
    pool, logits = model.features(torch.rand(3, 3, 32, 32))
    assert pool.shape == (3, 16) and logits.shape == (3, 18)


def test_extract_features_batches_like_one_pass():
    from PIL import Image

    net = SmallFeatures()
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in range(5)]
    pool3, logits3 = extract_features(net, ims, batch_size=3, size=16)
    with torch.no_grad():
        pool, logits = net.features(images_to_tensor(ims, size=16))
    np.testing.assert_allclose(pool3, pool.double().numpy(), rtol=1e-5, atol=1e-6)
    mu, sigma = feature_statistics(pool3)
    assert mu.shape == (12,) and sigma.shape == (12, 12)


def test_shipped_toy_classifier_loads_as_the_toy_feature_extractor():
    from sd_distill.modelref import TOY_ASSETS

    if not (TOY_ASSETS / "classifier" / "config.json").is_file():
        pytest.skip("toy:classifier is not shipped in this checkout")
    pool, logits = load_feature_extractor("toy:classifier").features(torch.rand(2, 3, 32, 32))
    assert pool.shape[0] == 2 and logits.shape == (2, 18)
