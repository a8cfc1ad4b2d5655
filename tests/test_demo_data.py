"""The committed demo dataset and the demo's data generation (fast: small sets, no models)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from eupe.demo import data as D
from eupe.demo.assets import DATA_DIR, load_assets, load_manifest, make_splits
from eupe.demo.text import TextSettings, render_text


def test_manifest_lists_every_file_and_each_exists_with_its_hash_and_license():
    manifest = load_manifest()
    listed = {e["file"] for e in manifest["images"]}
    on_disk = {
        p.relative_to(DATA_DIR).as_posix()
        for p in DATA_DIR.rglob("*")
        if p.is_file()
        and p.name != "manifest.json"
        and not p.relative_to(DATA_DIR).as_posix().startswith("LICENSES/")
    }
    assert listed == on_disk
    licensed = manifest["licenses"]
    for e in manifest["images"]:
        path = DATA_DIR / e["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == e["sha256"], e["file"]
        assert e["package"] in licensed, e
        assert e["license"] and e["original"]
        for lic in licensed[e["package"]]["files"]:
            assert (DATA_DIR / lic).is_file(), lic
    total = sum(p.stat().st_size for p in DATA_DIR.rglob("*") if p.is_file())
    assert total <= 20e6


def test_stamps_are_labeled_cutouts_with_alpha():
    stamps = [a for a in load_assets() if a.kind == "stamp"]
    assert len(stamps) > 500
    for a in stamps[::25]:
        with Image.open(a.path()) as im:
            assert im.mode == "RGBA" and max(im.size) <= load_manifest()["stamp_side"]
            assert im.getchannel("A").getextrema()[0] == 0  # transparent background kept
        assert a.label and f"/{a.label}/" in a.file


def test_splits_are_deterministic_disjoint_by_group_and_keep_text_out_of_heldout_photos():
    a, b = make_splits(0), make_splits(0)
    assert a == b
    assert len(a.knn_classes) == 17
    assert {s.group for s in a.knn_stamps}.isdisjoint({s.group for s in a.pool_stamps})
    assert {s.label for s in a.knn_stamps} == set(a.knn_classes)
    assert {p.group for p in a.heldout_photos}.isdisjoint({p.group for p in a.pool_photos})
    assert not any(p.has_text for p in a.heldout_photos)
    assert make_splits(1).knn_stamps != a.knn_stamps


def test_text_mask_is_exactly_the_half_covered_pixels():
    """On a flat background, out = bg (1 - a) + c a, so a is recoverable; the mask must be a >= 0.5."""
    bg = np.full((96, 160, 3), 200, dtype=np.uint8)
    settings = TextSettings(min_lines=1, max_lines=1, rotate_prob=0.5, min_height=0.2, max_height=0.3)
    fonts = D.demo_fonts()
    for seed in range(6):
        out, mask, region = render_text(bg, np.random.default_rng(seed), fonts, settings)
        diff = np.abs(out.astype(np.float64) - bg).max(axis=2)
        assert mask.any() and diff.max() > 60
        a = diff / diff.max()  # glyph interiors are fully covered (a = 1)
        ambiguous = np.abs(a - 0.5) < 0.03  # uint8 rounding near the threshold
        assert np.array_equal(mask[~ambiguous], (a >= 0.5)[~ambiguous])
        assert not (diff[~mask] > 0.55 * diff.max()).any()
        assert region[mask].all() and region.sum() > mask.sum()  # the line box holds its glyphs


def test_generation_is_deterministic_and_prefix_stable():
    splits = make_splits(0)
    settings = D.PoolSettings(size=64)
    p4 = D.training_pool(splits, 4, seed=0, settings=settings, progress=False)
    assert p4.shape == (4, 64, 64, 3) and p4.dtype == np.uint8
    assert np.array_equal(p4, D.training_pool(splits, 4, seed=0, settings=settings, progress=False))
    assert np.array_equal(p4[:2], D.training_pool(splits, 2, seed=0, settings=settings, progress=False))
    assert not np.array_equal(p4, D.training_pool(splits, 4, seed=1, settings=settings, progress=False))
    t1, m1, _ = D.text_set(splits, 3, seed=0, size=64)
    t2, m2, _ = D.text_set(splits, 3, seed=0, size=64)
    assert np.array_equal(t1, t2) and np.array_equal(m1, m2) and m1.any()


def test_knn_set_labels_follow_class_order():
    splits = make_splits(0)
    images, labels = D.knn_set(splits, size=32)
    assert images.shape == (len(splits.knn_stamps), 32, 32, 3)
    assert [splits.knn_classes[i] for i in labels] == [a.label for a in splits.knn_stamps]


def test_warp_moves_a_point_where_the_homography_says():
    rng = np.random.default_rng(3)
    h = D.random_homography(128, rng)
    img = np.zeros((128, 128, 3), dtype=np.uint8)
    img[60:63, 40:43] = 255
    warped = D.warp_image(img, h, (128, 128))[..., 0].astype(np.float64)
    ys, xs = np.nonzero(warped)
    centroid = np.array([(warped[ys, xs] * xs).sum(), (warped[ys, xs] * ys).sum()]) / warped[ys, xs].sum()
    np.testing.assert_allclose(centroid, D.apply_homography(h, np.array([[41.0, 61.0]]))[0], atol=0.25)


def test_homography_from_points_recovers_h_and_correspondences_land_inside():
    h = D.random_homography(96, np.random.default_rng(0))
    src = np.random.default_rng(1).uniform(0, 96, size=(12, 2))
    np.testing.assert_allclose(D.homography_from_points(src, D.apply_homography(h, src)), h, atol=1e-6)
    s, d = D.correspondences(h, (96, 96), (96, 96), step=16)
    assert len(s) > 10 and (d >= 0).all() and (d <= 95).all()
    np.testing.assert_allclose(D.apply_homography(h, s), d)


def test_graf_pair_rescales_the_ground_truth_homography():
    g1, g3, h = D.graf_pair(200, 160)
    info = json.loads((DATA_DIR / "graf" / "homography.json").read_text())
    assert g1.shape == (160, 200, 3) and g3.shape == (160, 200, 3)
    # A point in the stored 400x320 image, mapped by the stored H, then scaled: same as scale-then-h.
    p = np.array([[150.0, 120.0]])
    to_small = lambda q: (q + 0.5) * 0.5 - 0.5  # noqa: E731
    expect = to_small(D.apply_homography(np.asarray(info["H1to3"]), p))
    np.testing.assert_allclose(D.apply_homography(h, to_small(p)), expect, atol=1e-9)


@pytest.mark.parametrize("bad", [0.0, 1.0])
def test_bad_split_fraction_names_the_value(bad):
    from eupe.errors import ConfigError

    with pytest.raises(ConfigError, match=str(bad)):
        make_splits(0, knn_fraction=bad)
