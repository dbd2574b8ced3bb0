"""Model references: what a stage key sees of the weights behind a reference."""

import shutil

from sd_distill.modelref import model_fingerprint


def test_fingerprint_follows_the_weights_not_the_path(tmp_path):
    a = tmp_path / "a" / "teacher"
    shutil.copytree(model_fingerprint.__globals__["TOY_ASSETS"] / "classifier", a)
    b = tmp_path / "b" / "teacher"
    shutil.copytree(a, b)
    assert model_fingerprint(str(a)) == model_fingerprint(str(b)) == model_fingerprint("toy:classifier")
    weights = b / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # retrained in place: same size, one byte differs
    weights.write_bytes(bytes(data))
    assert model_fingerprint(str(b)) != model_fingerprint(str(a))


def test_hub_ids_missing_folders_and_store_urls_fingerprint_their_text():
    assert model_fingerprint("runwayml/stable-diffusion-v1-5") != model_fingerprint("stabilityai/sd-turbo")
    assert len(model_fingerprint("./no/such/folder")) == 16
    assert model_fingerprint("s3://bucket/store/distill/student/abc") == model_fingerprint("s3://bucket/store/distill/student/abc")
