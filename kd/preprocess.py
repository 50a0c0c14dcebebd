"""The one preprocessing path shared by training, the CLI `predict` and the app.

Every consumer turns uploaded bytes into the same grayscale uint8 picture, the
same square resize and the same normalisation, so a model never sees pixels
prepared differently from the ones it was trained on.  Anything that cannot be
used as an X-ray is refused with an `ImageError` whose text is a one-sentence
message meant for a person, never a traceback.
"""

from __future__ import annotations

import io
import logging
import os
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

PREPROCESS_VERSION: int = 1  # bump when output pixels change (keys the training cache)
MEAN: float = 0.5  # normalisation of [0, 1] grayscale, recorded in the model card
STD: float = 0.25
MAX_PIXELS = 60_000_000  # larger images are refused (decompression-bomb guard)
MIN_SIDE = 32  # smaller images are refused
MAX_BYTES = 50 * 1024 * 1024

# Pillow warns above this many pixels and refuses above twice as many; we turn
# the warning into a refusal for our own decode calls (see _open_with_pillow).
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

# Formats Pillow may try; fewer decoders means less attack surface (no EPS/ghostscript).
PILLOW_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP")  # JPEG includes MPO
# The one list of what is read, by name and file suffix: the uploader, `kd predict`, dataset folders and the
# refusal sentence all take it from here (Pillow's formats above, and DICOM through pydicom)
FORMATS = {"JPEG": (".jpeg", ".jpg"), "PNG": (".png",), "DICOM": (".dcm", ".dicom"), "TIFF": (".tif", ".tiff"),
           "BMP": (".bmp",), "WebP": (".webp",)}
FORMAT_NAMES = ", ".join(list(FORMATS)[:-1]) + f" or {list(FORMATS)[-1]}"
FILE_SUFFIXES = tuple(suffix for suffixes in FORMATS.values() for suffix in suffixes)
SUPPORTED = f"supported formats are {', '.join(list(FORMATS)[:-1])} and {list(FORMATS)[-1]}"
# larger decoded pictures are reduced (by an integer box filter, never below the model's size) before any
# conversion: a 7700 x 7700 RGBA PNG otherwise costs ~2 GB in float copies for a 160 px model input
REDUCE_ABOVE = 2048
# Mean absolute difference between colour channels (0..255) above which an
# image is a colour photograph rather than a grayscale X-ray saved as RGB.
COLOURFULNESS_LIMIT = 12.0
COLOUR_PHOTO_WARNING = (
    "This looks like a colour photograph, not a chest X-ray; the prediction is meaningless for it."
)

log = logging.getLogger(__name__)


class ImageError(ValueError):
    """A file that cannot be used as an X-ray; str(err) is a one-sentence human message."""


@dataclass(frozen=True)
class XRay:
    """A decoded X-ray in display orientation, ready for `to_square`."""

    pixels: np.ndarray  # 2-D uint8 grayscale, H x W
    original_size: tuple[int, int]  # (width, height) at full resolution, display orientation
    source: str  # "JPEG", "PNG", "DICOM", ...
    warnings: tuple[str, ...]


def load_xray(data: bytes, name: str = "upload", target_size: int | None = None) -> XRay:
    """Decode an uploaded file in memory into a grayscale X-ray, or raise ImageError.

    target_size lets large JPEGs decode at a reduced scale (never below target_size).
    """
    if len(data) == 0:
        raise ImageError("The file is empty (0 bytes).")
    if len(data) > MAX_BYTES:
        raise ImageError(
            f"The file is {len(data) / 2**20:.1f} MB, larger than the {MAX_BYTES // 2**20} MB limit."
        )
    try:
        if _looks_like_dicom(data):
            return _load_dicom(data, forced=False)
        try:
            return _load_with_pillow(data, target_size)
        except _NotAnImage:
            if name.lower().endswith((".dcm", ".dicom")):
                return _load_dicom(data, forced=True)
            raise ImageError(f"The file is not a readable image; {SUPPORTED}.") from None
    except ImageError:
        raise
    except MemoryError as err:
        raise ImageError("The image is too large to decode with the memory available.") from err
    except Exception as err:  # a decoder failed in a way we did not foresee
        log.warning("unexpected error decoding %r", name, exc_info=True)
        raise ImageError(
            "The image could not be decoded; the file may be damaged or in an unsupported variant."
        ) from err


def load_xray_file(path: str | os.PathLike, target_size: int | None = None) -> XRay:
    """Read a file from disk and load it like an upload; file errors become ImageError."""
    name = os.fspath(path)
    try:
        if os.path.getsize(name) > MAX_BYTES:
            raise ImageError(f"The file {name} is larger than the {MAX_BYTES // 2**20} MB limit.")
        with open(name, "rb") as f:
            data = f.read()
    except OSError as err:
        reason = err.strerror or "it could not be read"
        raise ImageError(f"Could not read the file {name}: {reason}.") from err
    return load_xray(data, name=os.path.basename(name), target_size=target_size)


def to_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """Stretch the whole image to size x size (aspect not kept, as in the training data)."""
    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise TypeError(f"expected a 2-D uint8 array, got {pixels.dtype} with shape {pixels.shape}")
    image = Image.fromarray(np.ascontiguousarray(pixels))
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))


CONTRASTS = ("none", "equalize", "clahe")


def apply_contrast(square: np.ndarray, method: str = "none") -> np.ndarray:
    """Contrast normalisation of the model's square picture, the same in training, evaluation and the app.

    equalize: global histogram equalisation (Pillow). clahe: contrast-limited adaptive histogram
    equalisation (Zuiderveld 1994, OpenCV; clip 2.0, 8x8 tiles), the usual choice for radiographs:
    both map each X-ray's exposure onto a common grey-level distribution."""
    if method == "none":
        return square
    if method == "equalize":
        return np.asarray(ImageOps.equalize(Image.fromarray(square)))
    if method == "clahe":
        import cv2

        return cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(np.ascontiguousarray(square))
    raise ValueError(f"Unknown contrast method {method!r}; choose one of {', '.join(CONTRASTS)}")


def prepare(data: bytes, size: int, name: str = "upload", contrast: str = "none") -> tuple[np.ndarray, XRay]:
    """Bytes to the size x size uint8 picture the model sees, plus the decoded XRay.

    The one path from a file to model pixels: the training cache (`prepare_file`), `kd predict`,
    `kd evaluate` and the app's Diagnose page all come here, so one file gives one probability."""
    xray = load_xray(data, name=name, target_size=size)
    return apply_contrast(to_square(xray.pixels, size), contrast), xray


def prepare_file(path: str | os.PathLike, size: int, contrast: str = "none") -> tuple[np.ndarray, XRay]:
    """`prepare` for a file on disk; file errors become ImageError."""
    xray = load_xray_file(path, target_size=size)
    return apply_contrast(to_square(xray.pixels, size), contrast), xray


def standardize(x01: torch.Tensor) -> torch.Tensor:
    """Pixels scaled to [0, 1] -> what the models take, (x - MEAN) / STD: the one place it is written (the
    augmentations work in [0, 1] and end here too)."""
    return (x01 - MEAN) / STD


def normalize(batch: torch.Tensor) -> torch.Tensor:
    """uint8 [..., H, W] on any device -> float32 standardize(x / 255)."""
    import torch

    if batch.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 pixels, got {batch.dtype} (already normalised?)")
    return standardize(batch.to(torch.float32).div_(255.0))


def to_tensor(square: np.ndarray) -> torch.Tensor:
    """A uint8 H x W picture -> normalised float32 tensor [1, 1, H, W]."""
    import torch

    if square.ndim != 2 or square.dtype != np.uint8:
        raise TypeError(f"expected a 2-D uint8 array, got {square.dtype} with shape {square.shape}")
    return normalize(torch.from_numpy(np.array(square, copy=True))[None, None])


# --------------------------------------------------------------------------- Pillow


class _NotAnImage(Exception):
    """Pillow does not recognise the bytes; they may still be a DICOM without preamble."""


def _load_with_pillow(data: bytes, target_size: int | None) -> XRay:
    image = _open_with_pillow(data)
    width, height = image.size
    _check_size(width, height)
    if target_size and image.format in ("JPEG", "MPO"):
        # Keep colour so the photo check still works; libjpeg scales by 1/2, 1/4 or 1/8.
        image.draft(image.mode, (target_size, target_size))
    _decode(image)
    notes: list[str] = []
    orientation = _exif_orientation(image, notes)  # after decoding: PNG reads EXIF by loading
    image = _reduced(image, target_size)
    if orientation in (5, 6, 7, 8):  # stored sideways: report the size as displayed
        width, height = height, width
    if image.format != "MPO" and getattr(image, "n_frames", 1) > 1:  # MPO: phone extras
        notes.append("The file holds several frames; only the first one was used.")
    source = "JPEG" if image.format == "MPO" else (image.format or "image")
    if orientation != 1:
        image = ImageOps.exif_transpose(image)
    pixels = _to_gray(image, notes)
    return XRay(pixels, (width, height), source, tuple(notes))


def _reduced(image: Image.Image, target_size: int | None) -> Image.Image:
    """A large decoded picture shrunk by the largest integer factor that keeps both sides >= max(target_size,
    REDUCE_ABOVE / 2) (what libjpeg's draft does for JPEG), so later conversions work on a small copy."""
    if not target_size or max(image.size) <= REDUCE_ABOVE:
        return image
    factor = min(image.size) // max(target_size, REDUCE_ABOVE // 2)
    if factor < 2:
        return image
    try:
        small = image.reduce(factor)
    except (ValueError, NotImplementedError):  # a mode reduce() does not do (e.g. 16-bit "I;16"): keep it
        return image
    small.info, small.format = image.info, image.format
    return small


def _open_with_pillow(data: bytes) -> Image.Image:
    """Read the header only; the pixel count is checked before anything is decoded."""
    try:
        with warnings.catch_warnings():
            # We check the size ourselves right after opening, with a clearer message.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)
    except Image.DecompressionBombError as err:
        declared = re.search(r"\((\d+) pixels\)", str(err))
        size = f" declares {int(declared.group(1)):,} pixels, which" if declared else ""
        raise ImageError(
            f"The image{size} is over the limit of {MAX_PIXELS:,} pixels "
            "(it may be a decompression bomb)."
        ) from err
    except (UnidentifiedImageError, SyntaxError, EOFError, ValueError) as err:
        raise _NotAnImage() from err
    except OSError as err:  # a recognised format whose header is cut short or broken
        raise ImageError(
            "The image header is truncated or damaged, so the file cannot be read."
        ) from err


def _check_size(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"The image is {width} x {height} pixels ({width * height / 1e6:.0f} megapixels), "
            f"over the limit of {MAX_PIXELS / 1e6:.0f} megapixels ({MAX_PIXELS:,} pixels)."
        )
    if min(width, height) < MIN_SIDE:
        raise ImageError(
            f"The image is only {width} x {height} pixels, too small; "
            f"the minimum is {MIN_SIDE} pixels on each side."
        )


def _exif_orientation(image: Image.Image, notes: list[str]) -> int:
    try:
        orientation = int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # a broken EXIF block should not cost the image
        notes.append("The EXIF orientation could not be read; the image is shown as stored.")
        return 1
    return orientation if 1 <= orientation <= 8 else 1


def _decode(image: Image.Image) -> None:
    """Decode the pixels, mapping decoder failures to human messages."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"The image is over the limit of {MAX_PIXELS:,} pixels.") from err
    except (OSError, SyntaxError, EOFError, ValueError) as err:
        if isinstance(err, EOFError) or "truncated" in str(err).lower():
            raise ImageError(
                "The image file is truncated or incomplete; the upload may have been cut off."
            ) from err
        raise ImageError("The image data is damaged and could not be decoded.") from err


def _to_gray(image: Image.Image, notes: list[str]) -> np.ndarray:
    """Any Pillow mode -> 2-D uint8 grayscale, with notes on what was changed."""
    mode = image.mode
    if mode == "L":
        return np.array(image, dtype=np.uint8)
    if mode.startswith(("I", "F")):  # 16-bit / 32-bit integer or float
        values = np.asarray(image)
        notes.append(
            f"High bit-depth image rescaled from its value range "
            f"{values.min():g}..{values.max():g} to 0..255."
        )
        return _scale_to_uint8(values)
    if mode == "1":
        return np.array(image.convert("L"), dtype=np.uint8)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "PA":
        image = image.convert("RGBA")
    alpha = None
    if image.mode in ("LA", "La", "RGBA", "RGBa"):
        alpha = np.asarray(image.getchannel("A"), dtype=np.float32)
        image = image.convert("L" if image.mode in ("LA", "La") else "RGB")
    if image.mode != "L":
        image = image.convert("RGB")  # CMYK, YCbCr, LAB, ... through Pillow's converters
        if _colourfulness(image) > COLOURFULNESS_LIMIT:
            notes.append(COLOUR_PHOTO_WARNING)
        image = image.convert("L")
    gray = np.array(image, dtype=np.uint8)
    if alpha is not None and alpha.min() < 255:
        notes.append("The transparency (alpha channel) was flattened onto a black background.")
        gray = np.rint(gray * (alpha / 255.0)).astype(np.uint8)
    return gray


def _colourfulness(rgb: Image.Image) -> float:
    """Mean absolute difference between channels on a small copy (0 for true grayscale)."""
    small = rgb.copy()
    small.thumbnail((128, 128))
    r, g, b = np.asarray(small, dtype=np.int16).transpose(2, 0, 1)
    return float((np.abs(r - g) + np.abs(g - b) + np.abs(b - r)).mean() / 3.0)


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Stretch the actual min..max range onto 0..255 (scaled, never clipped)."""
    values = np.asarray(values, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


# --------------------------------------------------------------------------- DICOM


def _looks_like_dicom(data: bytes) -> bool:
    return data[128:132] == b"DICM"


def _load_dicom(data: bytes, forced: bool) -> XRay:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom grumbles about non-conformant files
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            ds.get("PixelData")  # convert the element now so a broken one fails here
    except Exception as err:
        if forced:
            raise ImageError(f"The file is not a readable image; {SUPPORTED}.") from err
        raise ImageError("The DICOM file is damaged and could not be read.") from err
    if "PixelData" not in ds:
        if forced and not any(key in ds for key in ("SOPClassUID", "Modality", "Rows")):
            raise ImageError(f"The file is not a readable image; {SUPPORTED}.")
        raise ImageError(
            "The DICOM file has no pixel data (it may be a report or other non-image object)."
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageError(
            f"The DICOM file contains {frames} frames; please export a single-frame image "
            "(one X-ray) and upload that."
        )
    rows, columns = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    _check_size(columns, rows)
    _assume_transfer_syntax(ds)

    try:
        raw = ds.pixel_array
    except Exception as err:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and syntax.is_compressed:
            raise ImageError(
                f"The DICOM file is compressed with {syntax.name}, which is not supported; "
                "please export it uncompressed."
            ) from err
        raise ImageError(
            "The DICOM pixel data is incomplete or damaged and could not be decoded."
        ) from err

    notes: list[str] = []
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        raw = apply_color_lut(raw, ds)
    if raw.ndim == 3 and raw.shape[-1] == 3:  # colour DICOM (pydicom returns RGB)
        rgb = raw if raw.dtype == np.uint8 else _scale_to_uint8(raw)
        image = Image.fromarray(np.ascontiguousarray(rgb))
        if _colourfulness(image) > COLOURFULNESS_LIMIT:
            notes.append(COLOUR_PHOTO_WARNING)
        return XRay(np.array(image.convert("L")), (columns, rows), "DICOM", tuple(notes))
    if raw.ndim != 2:
        raise ImageError("The DICOM image has an unsupported pixel layout.")
    try:
        values = apply_voi_lut(apply_modality_lut(raw, ds), ds, index=0)
    except Exception as err:
        raise ImageError("The DICOM display window (VOI LUT) settings are invalid.") from err
    pixels = _scale_to_uint8(values)
    if photometric == "MONOCHROME1":  # low values are bright: invert to bone-is-bright
        pixels = 255 - pixels
    return XRay(pixels, (columns, rows), "DICOM", tuple(notes))


def _assume_transfer_syntax(ds) -> None:
    """A bare data set (no file meta) was read with a guessed encoding; record it so
    pydicom knows how to read the uncompressed pixels."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        return
    if implicit:
        syntax = ImplicitVRLittleEndian
    else:
        syntax = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax
