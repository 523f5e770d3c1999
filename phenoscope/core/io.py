"""Image reading and atomic file output."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".npy")
# A label image for ``<stem>.<ext>`` is ``<stem><suffix>.<any image ext>``, first match in this order
# (``_masks`` first: what ``phenoscope segment`` and cellpose write).
LABEL_SUFFIXES = ("_masks", "", "_labels", "_label", "_mask")


def label_file_for(image: Path, folder: Path) -> Path | None:
    """The label image of ``image`` in ``folder`` (``<stem>{_masks,,_labels,...}`` + an image
    extension, in that order of preference; never ``image`` itself), or None."""
    for suffix in LABEL_SUFFIXES:
        for ext in IMAGE_SUFFIXES:
            candidate = Path(folder) / f"{Path(image).stem}{suffix}{ext}"
            if candidate.is_file() and candidate.resolve() != Path(image).resolve():
                return candidate
    return None


def imread(path: str | Path) -> np.ndarray:
    """Read an image file into a numpy array (axes as stored: YX, YXC, CYX or ZYX...).

    PNG/JPEG/BMP via Pillow, TIFF via tifffile, ``.npy`` via numpy (``allow_pickle=False``).
    Raises ``ValueError`` with the file name for empty, truncated or unreadable files.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(path)
        elif suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                arr = np.asarray(im)
    except (OSError, ValueError, SyntaxError, EOFError) as err:  # corrupt / truncated files
        raise ValueError(f"{path}: cannot read image ({type(err).__name__}: {err})") from err
    if arr.size == 0:
        raise ValueError(f"{path}: image has no pixels (shape {arr.shape})")
    return arr


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_read_umask()  # read once at import (os.umask is process-wide, not thread-safe)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp *path* beside ``path`` (same suffix, for writers that need a file name); it is
    renamed onto ``path`` only if the block succeeds, and removed otherwise."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator:
    """Open a temp file beside ``path`` (``mode`` as for :func:`open`); it replaces ``path`` only if the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, mode) as fh:
        yield fh


def imwrite_tiff(path: str | Path, arr: np.ndarray, **kwargs) -> None:
    """Write ``arr`` as a (zlib-compressed) TIFF atomically."""
    import tifffile

    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, arr, compression="zlib", **kwargs)
