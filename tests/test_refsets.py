"""Reference sets for FID/KID (bench.metrics.refs): built from a folder of images or a dataset file
(.npz, as ADM's ImageNet reference batches) at a stated resolution with clean-fid's resize, in a
tiny feature space registered by the test (the Inception weights are not here); the manifest records
the source's checksum, count, resolution and feature extractor; precomputed statistics import;
corrupt files name the fix; absent Inception weights name the fetch command; and a row records the
reference's identity."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from cleanfid.resize import make_resizer
from PIL import Image

from bench.cli import main
from bench.metrics import refs
from bench.metrics.base import MetricContext
from bench.metrics.formulas import FrechetToReference
from bench.registry import METRICS

TINY = "tiny-rgb"


def _tiny_extract(images: torch.Tensor | list[np.ndarray], device: str = "cpu") -> np.ndarray:
    """8 numbers per image: the per-channel means and a 2x2 pooled luminance (float64)."""
    out = []
    for im in images:
        x = np.asarray(im, np.float64) / 255
        h, w = x.shape[0] // 2, x.shape[1] // 2
        lum = x.mean(2)
        out.append(
            np.r_[x.mean((0, 1)), x.std(), [lum[:h, :w].mean(), lum[:h, w:].mean(), lum[h:, :w].mean(), lum[h:, w:].mean()]]
        )
    return np.array(out)


@pytest.fixture(autouse=True)
def tiny_space(monkeypatch, tmp_path):
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))
    space = refs.FeatureSpace(TINY, "8-d colour statistics (a test's stand-in for Inception)", _tiny_extract, lambda: "tiny-v1")
    monkeypatch.setitem(refs.SPACES, TINY, space)
    refs._load_cached.cache_clear()
    return space


def _images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_a_folder_at_a_stated_resolution_uses_clean_fids_resize_and_writes_a_manifest(tmp_path, capsys):
    ims = _images(6, 24, 32)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(ims):
        Image.fromarray(im).save(folder / f"{i:02d}.png")
    path = refs.build("mini", TINY, images=folder, resolution=16)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["n"] == 6 and meta["resolution"] == 16 and meta["network_id"] == "tiny-v1"
    assert (
        "clean-fid resize (PIL bicubic) to 16x16" in meta["preprocess"] and "8-d colour statistics" in meta["feature_extractor"]
    )
    expect = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        expect.update(f"{p.name}\0{hashlib.sha256(p.read_bytes()).hexdigest()}\n".encode())
    assert meta["source_sha256"] == expect.hexdigest()
    # the features are those of the centre 24x24 crop resized by clean-fid to 16x16, quantised to uint8
    resize = make_resizer("PIL", False, "bicubic", (16, 16))
    by_hand = [np.clip(np.round(resize(np.ascontiguousarray(im[:, 4:28]))), 0, 255).astype(np.uint8) for im in ims]
    ref = refs.load("mini", TINY)
    np.testing.assert_allclose(ref.feats, _tiny_extract(by_hand), rtol=0, atol=1e-6)  # float32 storage
    assert ref.identity == f"mini/{TINY}@{meta['source_sha256'][:12]}"
    capsys.readouterr()
    assert main(["ref", "list"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("mini "))
    assert TINY in line and "6 images" in line and "16px" in line and meta["source_sha256"][:12] in line


def test_an_npz_reference_batch_records_its_checksum_labels_and_identity(tmp_path):
    x = _images(10, 16, 16, seed=1)
    f = tmp_path / "VIRTUAL_tiny16_labeled.npz"
    np.savez(f, arr_0=x, arr_1=np.arange(10) % 4)
    assert main(["ref", "build", "tiny16", "--npz", str(f), "--features", TINY]) == 0
    ref = refs.load("tiny16", TINY)
    assert ref.meta["source_sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert ref.meta["n"] == 10 and ref.meta["n_classes"] == 4 and ref.meta["resolution"] == 16
    np.testing.assert_allclose(ref.mu, _tiny_extract(list(x)).mean(0), atol=1e-12)
    first = ref.identity
    np.savez(f, arr_0=x[::-1].copy(), arr_1=np.arange(10) % 4)  # other bytes: another identity
    refs.build("tiny16", TINY, npz=f)
    assert refs.load("tiny16", TINY).identity != first
    # NCHW batches are accepted; a torn file or a wrong dtype names what is wrong
    np.savez(tmp_path / "nchw.npz", images=x.transpose(0, 3, 1, 2))
    refs.build("nchw", TINY, npz=tmp_path / "nchw.npz")
    np.testing.assert_allclose(refs.load("nchw", TINY).feats, _tiny_extract(list(x)), atol=1e-6)
    (tmp_path / "torn.npz").write_bytes(f.read_bytes()[:500])
    with pytest.raises(ValueError, match="not a readable .npz .*re-copy it"):
        refs.build("torn", TINY, npz=tmp_path / "torn.npz")
    np.savez(tmp_path / "float.npz", arr_0=x.astype(np.float32))
    with pytest.raises(ValueError, match="must be uint8"):
        refs.build("float", TINY, npz=tmp_path / "float.npz")


def test_corrupt_statistics_name_the_rebuild_command(tmp_path):
    np.savez(tmp_path / "b.npz", arr_0=_images(5, 8, 8))
    path = refs.build("b", TINY, npz=tmp_path / "b.npz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(refs.CorruptReferenceError, match=f"rebuild them with `bench ref build b --features {TINY}`"):
        refs.load("b", TINY)


def test_imported_statistics_serve_fid_only(tmp_path):
    feats = _tiny_extract(list(_images(50, 8, 8, seed=2)))
    stats = tmp_path / "val2014.npz"
    np.savez(stats, mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    assert main(["ref", "import", "coco-mlperf", "--stats", str(stats), "--features", TINY]) == 0
    ref = refs.load("coco-mlperf", TINY)
    assert ref.meta["stats_only"] and ref.meta["source_sha256"] == hashlib.sha256(stats.read_bytes()).hexdigest()
    assert FrechetToReference(ref.mu, ref.sigma)(feats) == pytest.approx(0.0, abs=1e-6)  # the same set: distance 0
    with pytest.raises(refs.MissingReferenceError, match="holds only FID's mean and covariance.*bench ref build coco-mlperf"):
        refs.require_features(ref, "kid_inception")
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3), sigma=np.zeros((2, 2)))
    assert main(["ref", "import", "x", "--stats", str(tmp_path / "bad.npz"), "--features", TINY]) == 2


def test_without_the_inception_weights_the_commands_name_them_and_the_fetch(tmp_path, capsys):
    from bench import weights

    if weights.find("inception-2015-12-05") is not None:
        pytest.skip("the Inception weights are on this machine")
    np.savez(tmp_path / "r.npz", arr_0=_images(3, 8, 8))
    assert main(["ref", "build", "imagenet256", "--npz", str(tmp_path / "r.npz"), "--resolution", "256"]) == 2
    err = capsys.readouterr().err
    assert "inception-2015-12-05" in err and "`bench weights fetch inception-2015-12-05`" in err
    assert not (refs.refs_dir() / "imagenet256").exists()  # nothing written, no value invented
    assert main(["ref", "import", "m", "--stats", str(tmp_path / "r.npz"), "--features", "inception-pytorch-fid"]) == 2
    assert "bench weights fetch inception-2015-12-05" in capsys.readouterr().err


def test_a_row_records_the_identity_of_the_reference_it_used(tmp_path):
    """A tiny digits job scored with FID: the row's reference_id names the set, space and digest."""
    from bench.models import build_model
    from bench.suite import Job, ModelSpec, Suite
    from bench.worker import run_job

    suite = Suite(
        "t", "test", [ModelSpec("digits-unet")], [], [2], [1.0], ["fid"], n_samples=8, batch_size=8, bootstrap=2, warmup=0
    )
    job = Job(ModelSpec("digits-unet"), "ddim", (), 2, 1.0, 0, 8, 8)
    row, _ = run_job(job, build_model("digits-unet"), suite)
    ref = refs.load("digits-train", "digits")
    assert row["reference_id"] == ref.identity and row["reference_id"].startswith("digits-train/digits@")
    ctx = MetricContext(torch.zeros(4, 1, 16, 16), None, build_model("digits-unet"), refset="digits-heldout")
    METRICS.get("kid")(ctx)
    assert ctx.cache["reference_ids"] == {"digits": refs.load("digits-heldout", "digits").identity}
