#!/usr/bin/env python
"""Build the compact demo dataset committed under src/eupe/demo/data/ (re-runnable, deterministic).

The demo must run with no apt install and no download, so the images it needs are copied once,
downscaled, from packages into the repo, together with a manifest (source package, original path,
license, label) and the packages' license texts. Run this only to rebuild the committed assets:

    apt-get install -y tuxpaint-stamps-default opencv-doc fonts-dejavu-core
    .venv/bin/pip install scikit-image scikit-learn
    .venv/bin/python scripts/build_demo_data.py            # writes src/eupe/demo/data/
    .venv/bin/python scripts/build_demo_data.py --check    # rebuild to a temp dir, compare bytes

Sources: Tux Paint stamps photo cut-outs (GPL-2, label = category folder, alpha kept), OpenCV sample
photos incl. graf1/graf3 + ground-truth homography (Apache-2.0 AND BSD-3-Clause), scikit-image
sample photos (public domain / CC0 as documented per image), scikit-learn china/flower (CC-BY-2.0),
and two DejaVu fonts (Bitstream Vera license) so rendered text is identical on every machine.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "eupe" / "demo" / "data"
STAMPS = Path("/usr/share/tuxpaint/stamps")
OPENCV = Path("/usr/share/doc/opencv-doc/examples/data")
DEJAVU = Path("/usr/share/fonts/truetype/dejavu")
STAMP_SIDE = 160  # long side of a cut-out; composited at ~25-60% of a 224 view
PHOTO_SIDE = 320  # long side of a background / held-out photo
GRAF_SCALE = 0.5  # graf1/graf3 800x640 -> 400x320, homography rescaled exactly
JPEG_QUALITY = 90

# Top-level Tux Paint folders that are themes, not categories: their sub-folder is the label
# (animals/mammals -> mammals). Other top-level folders (vehicles, space, ...) are the label.
THEME_FOLDERS = {"animals", "food", "symbols", "plants", "seasonal", "town", "household"}
# Rendered letters are not photos (and would be text for the OCR benchmark): left out.
SKIP_STAMP_PARTS = {"cartoon", "alphabets"}

OPENCV_PHOTOS = [
    "HappyFish.jpg", "aero1.jpg", "aero3.jpg", "aloeL.jpg", "aloeR.jpg", "apple.jpg", "baboon.jpg",
    "basketball1.png", "basketball2.png", "blox.jpg", "board.jpg", "box.png", "box_in_scene.png",
    "building.jpg", "butterfly.jpg", "cards.png", "chicky_512.png", "ela_original.jpg", "fruits.jpg",
    "home.jpg", "imageTextN.png", "imageTextR.png", "left.jpg", "right.jpg", "leuvenA.jpg",
    "leuvenB.jpg", "licenseplate_motion.jpg", "messi5.jpg", "notes.png", "orange.jpg",
    "pca_test1.jpg", "rubberwhale1.png", "rubberwhale2.png", "smarties.png", "squirrel_cls.jpg",
    "starry_night.jpg", "stuff.jpg", "sudoku.png", "text_defocus.jpg", "text_motion.jpg",
]  # fmt: skip
# Images that already contain printed text: kept out of the text-segmentation benchmark, whose
# masks only know the text the demo renders itself.
HAS_TEXT = {"imageTextN", "imageTextR", "notes", "sudoku", "licenseplate_motion", "text_defocus",
            "text_motion", "pca_test1", "box", "box_in_scene", "stuff", "rocket", "text", "board"}  # fmt: skip

# scikit-image photos and the terms their docstrings state (skimage.data.<fn>.__doc__).
SKIMAGE_PHOTOS = {
    "astronaut.png": "Public domain (NASA Great Images; 'No known copyright restrictions')",
    "chelsea.png": "CC0 by the photographer (Stefan van der Walt)",
    "coffee.png": "CC0 by the photographer (Rachel Michetti), courtesy of Pikolo Espresso Bar",
    "rocket.jpg": "Public domain (SpaceX photos released into the public domain)",
    "hubble_deep_field.jpg": "Public domain (NASA/HubbleSite)",
    "camera.png": "CC0 by the photographer (Lav Varshney)",
    "coins.png": "No known copyright restrictions (Brooklyn Museum Collection)",
    "text.png": "Public domain (Wikipedia File:Corner.png)",
    "brick.png": "CC0 (CC0Textures Bricks25)",
    "grass.png": "CC0 (DeviantArt linolafett Grass-01)",
    "gravel.png": "CC0 (CC0Textures Gravel04)",
    "retina.jpg": "CC0 1.0 (Wikimedia Commons, Mikael Haggstrom)",
    "ihc.png": "No known copyright restrictions (CMMI)",
    "clock_motion.png": "Public domain, released by the photographer (Stefan van der Walt)",
}
SKLEARN_PHOTOS = {
    "china.jpg": "CC-BY-2.0, 'Some rights reserved by danielbuechele' (flickr 6061409035)",
    "flower.jpg": "CC-BY-2.0, 'Some rights reserved by vultilion' (flickr 6056698931)",
}
FONTS = ["DejaVuSans-Bold.ttf", "DejaVuSerif.ttf"]

LICENSE_FILES = {  # dest name -> source file
    "tuxpaint-stamps-default.copyright": Path("/usr/share/doc/tuxpaint-stamps-default/copyright"),
    "opencv-doc.copyright": Path("/usr/share/doc/opencv-doc/copyright"),
    "fonts-dejavu-core.copyright": Path("/usr/share/doc/fonts-dejavu-core/copyright"),
    "GPL-2": Path("/usr/share/common-licenses/GPL-2"),
    "Apache-2.0": Path("/usr/share/common-licenses/Apache-2.0"),
}
LICENSES = {
    "tuxpaint-stamps-default": ("GPL-2.0-or-later", ["tuxpaint-stamps-default.copyright", "GPL-2"]),
    "opencv-doc": ("Apache-2.0 AND BSD-3-Clause", ["opencv-doc.copyright", "Apache-2.0"]),
    "scikit-image": ("see 'terms' (package BSD-3-Clause)", ["scikit-image.LICENSE.txt"]),
    "scikit-learn": ("CC-BY-2.0 (package BSD-3-Clause)", ["scikit-learn.images.README.txt", "scikit-learn.COPYING"]),
    "fonts-dejavu-core": ("Bitstream-Vera AND public-domain", ["fonts-dejavu-core.copyright"]),
}  # fmt: skip


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _fit(img: Image.Image, side: int) -> Image.Image:
    """Downscale so the long side is at most `side` (never upscale); Lanczos for crisp small images."""
    w, h = img.size
    s = side / max(w, h)
    if s >= 1:
        return img.copy()
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)


def _save(img: Image.Image, path: Path) -> None:
    """Deterministic encoders: no timestamps or optional chunks, fixed quality."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    if path.suffix == ".png":
        img.save(buf, format="PNG", optimize=True)
    else:
        img.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    path.write_bytes(buf.getvalue())


def _stamp_label(rel: Path) -> str:
    parts = rel.parts
    return parts[1] if parts[0] in THEME_FOLDERS and len(parts) > 2 else parts[0]


def _crop_alpha(img: Image.Image) -> Image.Image:
    """Trim fully transparent borders so a cut-out's size means its object's size."""
    box = img.getchannel("A").getbbox()
    return img.crop(box) if box else img


def build_stamps(out: Path, entries: list[dict]) -> None:
    files = sorted(
        p for p in STAMPS.rglob("*.png") if not SKIP_STAMP_PARTS & set(p.relative_to(STAMPS).parts)
    )
    names = {p.relative_to(STAMPS).with_suffix("").as_posix() for p in files}
    for p in files:
        rel = p.relative_to(STAMPS)
        label = _stamp_label(rel)
        img = _crop_alpha(Image.open(p).convert("RGBA"))
        dest = Path("stamps") / label / (_slug(rel.with_suffix("").as_posix().replace("/", "-")) + ".png")
        _save(_fit(img, STAMP_SIDE), out / dest)
        stem = rel.with_suffix("").as_posix()
        # "x_mirror" is a flipped copy of "x": same group, so no split ever separates the pair.
        base = (
            stem[: -len("_mirror")] if stem.endswith("_mirror") and stem[: -len("_mirror")] in names else stem
        )
        entries.append({"file": dest.as_posix(), "kind": "stamp", "label": label, "group": base,
                        "package": "tuxpaint-stamps-default", "original": str(p),
                        "license": LICENSES["tuxpaint-stamps-default"][0]})  # fmt: skip


def _original(path: Path) -> str:
    """Debian files by absolute path; files of Python packages relative to site-packages (portable)."""
    parts = path.parts
    if "site-packages" in parts:
        return Path(*parts[parts.index("site-packages") + 1 :]).as_posix()
    return str(path)


def _photo_entry(dest: Path, package: str, original: Path, license_: str, name: str) -> dict:
    return {"file": dest.as_posix(), "kind": "photo", "label": None, "group": name, "package": package,
            "original": _original(original), "license": license_, "has_text": name in HAS_TEXT}  # fmt: skip


def build_photos(out: Path, entries: list[dict]) -> None:
    import skimage
    import sklearn

    sk_dir = Path(skimage.__file__).parent / "data"
    skl_dir = Path(sklearn.__file__).parent / "datasets" / "images"
    sources = [(OPENCV / f, "opencv-doc", LICENSES["opencv-doc"][0]) for f in OPENCV_PHOTOS]
    sources += [(sk_dir / f, "scikit-image", t) for f, t in SKIMAGE_PHOTOS.items()]
    sources += [(skl_dir / f, "scikit-learn", t) for f, t in SKLEARN_PHOTOS.items()]
    for src, package, license_ in sources:
        name = Path(src).stem
        img = Image.open(src)
        if img.mode in ("RGBA", "LA", "P"):  # flatten on white, as the images are shown in the docs
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        dest = Path("photos") / f"{_slug(package)}-{_slug(name)}.jpg"
        _save(_fit(img.convert("RGB"), PHOTO_SIDE), out / dest)
        entries.append(_photo_entry(dest, package, src, license_, name))


def _read_opencv_matrix(path: Path) -> np.ndarray:
    text = path.read_text()
    data = re.search(r"<data>(.*?)</data>", text, re.S)
    if data is None:
        sys.exit(f"no <data> block in {path}; is opencv-doc installed intact?")
    return np.array([float(v) for v in data.group(1).split()], dtype=np.float64).reshape(3, 3)


def build_graf(out: Path, entries: list[dict]) -> dict:
    """graf1 -> graf3 (Oxford affine benchmark) at GRAF_SCALE; H' = S H S^-1 maps scaled pixels."""
    h13 = _read_opencv_matrix(OPENCV / "H1to3p.xml")
    # Pixel centers at integer coordinates (OpenCV): x_small = s * (x + 0.5) - 0.5.
    off = 0.5 * GRAF_SCALE - 0.5
    s = np.array([[GRAF_SCALE, 0.0, off], [0.0, GRAF_SCALE, off], [0.0, 0.0, 1.0]])
    h_scaled = s @ h13 @ np.linalg.inv(s)
    h_scaled /= h_scaled[2, 2]
    sizes = {}
    for name in ("graf1", "graf3"):
        img = Image.open(OPENCV / f"{name}.png").convert("RGB")
        w, h = img.size
        size = (round(w * GRAF_SCALE), round(h * GRAF_SCALE))
        if abs(size[0] - w * GRAF_SCALE) > 1e-9 or abs(size[1] - h * GRAF_SCALE) > 1e-9:
            sys.exit(f"{name} is {w}x{h}; GRAF_SCALE={GRAF_SCALE} must give whole pixels")
        dest = Path("graf") / f"{name}.png"
        _save(img.resize(size, Image.Resampling.LANCZOS), out / dest)
        sizes[name] = list(size)
        entries.append({"file": dest.as_posix(), "kind": "graf", "label": None, "group": name,
                        "package": "opencv-doc", "original": str(OPENCV / f"{name}.png"),
                        "license": LICENSES["opencv-doc"][0]})  # fmt: skip
    graf = {"scale": GRAF_SCALE, "size": sizes, "H1to3": h_scaled.tolist(), "H1to3_original": h13.tolist(),
            "convention": "x3 ~ H1to3 @ [x1, y1, 1], pixel coordinates of the stored images, pixel centers at integers"}  # fmt: skip
    (out / "graf" / "homography.json").write_text(json.dumps(graf, indent=1) + "\n")
    entries.append({"file": "graf/homography.json", "kind": "graf_h", "label": None, "group": "graf",
                    "package": "opencv-doc", "original": str(OPENCV / "H1to3p.xml"),
                    "license": LICENSES["opencv-doc"][0]})  # fmt: skip
    return graf


def build_fonts(out: Path, entries: list[dict]) -> None:
    for f in FONTS:
        dest = Path("fonts") / f
        (out / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(DEJAVU / f, out / dest)
        entries.append({"file": dest.as_posix(), "kind": "font", "label": None, "group": f,
                        "package": "fonts-dejavu-core", "original": str(DEJAVU / f),
                        "license": LICENSES["fonts-dejavu-core"][0]})  # fmt: skip


def build_licenses(out: Path) -> None:
    import skimage
    import sklearn

    lic = out / "LICENSES"
    lic.mkdir(parents=True, exist_ok=True)
    files = dict(LICENSE_FILES)
    sk_meta = next(Path(skimage.__file__).parent.parent.glob("scikit_image-*.dist-info"))
    skl_meta = next(Path(sklearn.__file__).parent.parent.glob("scikit_learn-*.dist-info"))
    files["scikit-image.LICENSE.txt"] = sk_meta / "LICENSE.txt"
    files["scikit-learn.COPYING"] = skl_meta / "licenses" / "COPYING"
    files["scikit-learn.images.README.txt"] = (
        Path(sklearn.__file__).parent / "datasets" / "images" / "README.txt"
    )
    for dest, src in sorted(files.items()):
        if not src.is_file():
            sys.exit(
                f"license file {src} is missing; install the package it belongs to (see this script's docstring)"
            )
        shutil.copyfile(src, lic / dest)


def build(out: Path) -> dict:
    for p in (STAMPS, OPENCV, DEJAVU):
        if not p.is_dir():
            sys.exit(
                f"{p} not found: apt-get install -y tuxpaint-stamps-default opencv-doc fonts-dejavu-core"
            )
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    entries: list[dict] = []
    build_stamps(out, entries)
    build_photos(out, entries)
    graf = build_graf(out, entries)
    build_fonts(out, entries)
    build_licenses(out)
    for e in entries:
        e["sha256"] = hashlib.sha256((out / e["file"]).read_bytes()).hexdigest()
    counts: dict[str, int] = {}
    for e in entries:
        if e["kind"] == "stamp":
            counts[e["label"]] = counts.get(e["label"], 0) + 1
    manifest = {
        "description": "Compact demo dataset for `eupe demo`, built by scripts/build_demo_data.py",
        "licenses": {k: {"spdx": v[0], "files": [f"LICENSES/{f}" for f in v[1]]} for k, v in LICENSES.items()},
        "stamp_side": STAMP_SIDE, "photo_side": PHOTO_SIDE, "graf": {"scale": graf["scale"], "size": graf["size"]},
        "stamp_counts": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        "images": entries,
    }  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--check", action="store_true", help="rebuild into a temp dir and compare with --out")
    args = ap.parse_args()
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            build(Path(tmp) / "data")
            fresh, committed = _digests(Path(tmp) / "data"), _digests(args.out)
            diff = sorted(k for k in fresh.keys() | committed.keys() if fresh.get(k) != committed.get(k))
            print("identical" if not diff else f"{len(diff)} files differ, e.g. {diff[:10]}")
            sys.exit(1 if diff else 0)
    manifest = build(args.out)
    n = {k: sum(e["kind"] == k for e in manifest["images"]) for k in ("stamp", "photo", "graf", "font")}
    print(f"wrote {args.out}: {n}, {_tree_bytes(args.out) / 1e6:.2f} MB")
    print("stamps per label:", manifest["stamp_counts"])


if __name__ == "__main__":
    main()
