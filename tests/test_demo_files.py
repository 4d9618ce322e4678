"""Every file of the demo mount opens with a reader of its format.

The demo (`python -m gcfs.fakegc`, the fake every mount test runs against) stands for the real
site, so its images must be real images: a user tries SimpleITK, tifffile, OpenSlide or
pydicom on them first. Walked through a real mount, so what is checked is what a user gets:
MHA and MHD (with its .zraw) with SimpleITK, TIFF with tifffile (and the tiled whole-slide
TIFF with OpenSlide too), DICOM instances with pydicom, every CSV with the csv module.

The 300 MiB slide is opened and one tile read, not every byte: the test's cost stays bounded,
and the storage bytes it fetched prove it.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import pydicom
import pytest
import SimpleITK as sitk
import tifffile

from gcfs.fakegc import FakeGC
from gcfs.fakegc.world import TILE, WSI_COLUMNS, WSI_ROWS, WSI_SIZE
from tests.conftest import Mount

MiB = 2**20
BIG_TIFF = "biopsy-10005-wsi.tif"


@pytest.fixture
def mount(mount_gcfs: Callable[..., Mount], tmp_path: Path) -> Mount:
    return mount_gcfs("--cache-dir", str(tmp_path / "cache"))


def demo_files(root: Path) -> list[Path]:
    """Every file reached by walking the mount (symlinks not followed: pk links lead to
    directories walked anyway)."""
    found = []
    for directory, _, names in os.walk(root):
        found.extend(Path(directory) / name for name in names)
    return found


def test_every_demo_file_opens_with_its_reader(mount: Mount, fake: FakeGC, world: Any) -> None:
    files = demo_files(mount.path)
    images = {f.name: image for image in world.images.values() for f in image.files}
    opened: dict[str, int] = {}

    def seen(kind: str) -> None:
        opened[kind] = opened.get(kind, 0) + 1

    for path in files:
        suffix = path.suffix.lower()
        if suffix in (".mha", ".mhd"):
            array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
            image = images[path.name]
            shape = [image.depth, image.height, image.width]
            assert list(array.shape) == [n for n in shape if n], path
            seen(suffix)
        elif suffix == ".zraw":
            assert path.with_suffix(".mhd").exists(), path  # read through its header above
        elif suffix in (".tif", ".tiff") and path.name != BIG_TIFF:
            array = tifffile.imread(path)
            image = images[path.name]
            assert array.shape[:2] == (image.height, image.width), path
            seen(".tif")
        elif suffix == ".dcm":
            dataset = pydicom.dcmread(path)
            assert dataset.SOPInstanceUID == path.stem
            assert dataset.pixel_array.shape == (dataset.Rows, dataset.Columns)
            seen(".dcm")
        elif suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as handle:
                rows = list(csv.reader(handle, strict=True))
            assert rows and all(len(row) == len(rows[0]) for row in rows), path
            seen(".csv")
    # Each format is in the demo; a walk that missed one would prove nothing about it.
    assert set(opened) == {".mha", ".mhd", ".tif", ".dcm", ".csv"}, opened
    # answers.csv of the two reader studies the demo user sees, at least; other tables
    # (items.csv, jobs.csv, display-sets.csv, where the tree has them) are walked alike.
    assert opened[".csv"] >= 2


def test_whole_slide_tiff_opens_with_tifffile_and_openslide(mount: Mount, fake: FakeGC) -> None:
    """The 300 MiB slide is a tiled RGB TIFF: tifffile parses its IFD and decodes a tile,
    OpenSlide's generic-TIFF driver opens it and reads the same pixels, and all of that costs
    a few MiB of storage, not the file."""
    found = [p for p in demo_files(mount.path) if p.name == BIG_TIFF]
    assert len(found) == 1
    path = found[0]
    assert path.stat().st_size == WSI_SIZE
    fake.reset_counts()
    width, height = WSI_COLUMNS * TILE, WSI_ROWS * TILE
    last = WSI_COLUMNS * WSI_ROWS - 1  # the last tile: the end of the file
    with tifffile.TiffFile(path) as tiff:
        page = tiff.pages[0]
        assert isinstance(page, tifffile.TiffPage)
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (TILE, TILE)
        assert page.shape == (height, width, 3) and page.compression == 1
        assert page.dataoffsets[last] + page.databytecounts[last] == WSI_SIZE
        handle = tiff.filehandle
        handle.seek(page.dataoffsets[last])
        tile, _, _ = page.decode(handle.read(page.databytecounts[last]), last)
    assert tile is not None and tile.shape == (1, TILE, TILE, 3)
    slide = openslide.OpenSlide(path)
    try:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert slide.dimensions == (width, height)
        x, y = width - TILE, height - TILE
        region = np.asarray(slide.read_region((x, y), 0, (TILE, TILE)))
    finally:
        slide.close()
    assert (region[:, :, :3] == tile[0]).all()  # the same pixels through both readers
    assert fake.storage_bytes_sent < 32 * MiB, fake.storage_bytes_sent
