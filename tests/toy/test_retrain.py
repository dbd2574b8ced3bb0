"""The shipped toy models are what ``scripts/train_toy_models.py`` produces.

What is checked, and how:
* every shipped model's ``train_summary.json`` records the trainer's current default config (so the one
  command retrains exactly the shipped recipe, on the CPU);
* the trainers are bitwise deterministic on CPU (two short runs, identical weights);
* the cheapest model, ``toy:classifier``, is retrained from scratch by the script and matches the shipped
  weights within float tolerance (slow: about a minute on an idle core).
"""

import importlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sd_distill.modelref import TOY_ASSETS

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("train_toy_models", ROOT / "scripts" / "train_toy_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "name, config",
    [
        ("sd", "sd_distill.toy.train_sd:ToySDConfig"),
        ("sd-lpb2", "sd_distill.toy.train_sd:ToySDLpb2Config"),
        ("classifier", "sd_distill.toy.train_classifier:ToyClassifierConfig"),
        ("hps", "sd_distill.toy.train_hps:ToyHPSConfig"),
        ("blip", "sd_distill.toy.train_blip:ToyBlipConfig"),
    ],
)
def test_shipped_models_were_trained_with_the_current_default_recipe(name, config):
    module, cls = config.split(":")
    defaults = json.loads(json.dumps(getattr(importlib.import_module(module), cls)().model_dump()))
    shipped = json.loads((TOY_ASSETS / name / "train_summary.json").read_text())["config"]
    assert shipped == defaults


def test_shipped_asset_folders_are_small():
    total = sum(p.stat().st_size for p in TOY_ASSETS.rglob("*") if p.is_file())
    assert total < 20 * 2**20, f"toy assets grew to {total / 2**20:.1f} MiB"


def test_classifier_training_is_bitwise_deterministic_on_cpu(tmp_path):
    from sd_distill.toy.train_classifier import ToyClassifierConfig, train_toy_classifier

    cfg = ToyClassifierConfig(n_train=64, n_val=8, steps=4, batch=16)
    train_toy_classifier(tmp_path / "a", cfg)
    train_toy_classifier(tmp_path / "b", cfg)
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sd_training_is_bitwise_deterministic_on_cpu(tmp_path):
    from sd_distill.toy.train_sd import ToySDConfig, train_toy_sd

    cfg = ToySDConfig(n_scenes=16, vae_steps=2, vae_batch=4, unet_steps=2, unet_batch=4, v_steps=0)
    train_toy_sd(tmp_path / "a", cfg)
    train_toy_sd(tmp_path / "b", cfg)
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        a, b = load_file(str(tmp_path / "a" / part)), load_file(str(tmp_path / "b" / part))
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_train_script_rejects_unknown_model_names(capsys):
    with pytest.raises(SystemExit):
        _script().main(["--only", "nope"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.slow
def test_retraining_the_classifier_reproduces_the_shipped_weights(tmp_path):
    _script().main(["--only", "classifier", "--out", str(tmp_path)])
    fresh = load_file(str(tmp_path / "classifier" / "model.safetensors"))
    shipped = load_file(str(TOY_ASSETS / "classifier" / "model.safetensors"))
    assert fresh.keys() == shipped.keys()
    worst = max(float((fresh[k].float() - shipped[k].float()).abs().max()) for k in fresh)
    assert worst < 1e-3, f"largest weight difference {worst:.2e}"
    assert json.loads((tmp_path / "classifier" / "config.json").read_text()) == json.loads(
        (TOY_ASSETS / "classifier" / "config.json").read_text())


def test_weight_check_finds_a_changed_tensor_and_a_missing_file(tmp_path):
    """``train_toy_models.py --check`` compares retrained folders with the shipped ones this way."""
    import shutil

    from safetensors.torch import save_file

    diff = _script().weight_differences
    shipped = TOY_ASSETS / "classifier"
    same = tmp_path / "same"
    shutil.copytree(shipped, same)
    assert diff(same, shipped) == {"model.safetensors": 0.0}
    state = load_file(str(same / "model.safetensors"))
    name = sorted(state)[0]
    state[name] = state[name] + 0.01
    save_file(state, str(same / "model.safetensors"))
    assert abs(diff(same, shipped)["model.safetensors"] - 0.01) < 1e-6
    (same / "model.safetensors").unlink()
    assert diff(same, shipped)["model.safetensors"] == float("inf")
