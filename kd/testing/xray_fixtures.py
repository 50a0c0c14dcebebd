"""Test images generated in memory: good X-ray-like files and every kind of bad upload.

Plain functions returning bytes (no pytest), so unit tests, CLI tests and the
app's browser tests can all share the same cases.  Everything is deterministic
and fast; the two large cases are built by hand as compressed zero rows.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

# ----------------------------------------------------------------------------- pictures


def _unit_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates in [0, 1], float32, broadcastable to (h, w)."""
    v = (np.arange(h, dtype=np.float32) / max(h - 1, 1))[:, None]
    u = (np.arange(w, dtype=np.float32) / max(w - 1, 1))[None, :]
    return v, u


LUNGS = ((0.32, 0.45), (0.68, 0.45))  # (u, v) centres of the two lung fields
LUNG_RADII = (0.14, 0.28)


def xray_like_array(h: int = 256, w: int = 256, seed: int = 0) -> np.ndarray:
    """A cheap chest-X-ray-ish uint8 picture: dark background, bright torso,
    darker lung ellipses (brighter at their rims), ribs and a bright spine band."""
    rng = np.random.default_rng(seed)
    v, u = _unit_grid(h, w)
    jitter = rng.uniform(-0.02, 0.02, size=2).astype(np.float32)
    u = u + jitter[0]
    v = v + jitter[1]
    img = np.full((h, w), 12.0, dtype=np.float32)
    torso = ((u - 0.5) / 0.46) ** 2 + ((v - 0.58) / 0.52) ** 2 < 1.0
    img = np.where(torso, 150.0, img)
    for cu, cv in LUNGS:
        r2 = ((u - cu) / LUNG_RADII[0]) ** 2 + ((v - cv) / LUNG_RADII[1]) ** 2
        ribs = 12.0 * (np.sin(v * 45.0) > 0.6)
        img = np.where(r2 < 1.0, 55.0 + 50.0 * r2 + ribs, img)
    spine = (np.abs(u - 0.5) < 0.045) & torso
    img = np.where(spine, 205.0, img)
    img = img + rng.normal(0.0, 3.0, size=(h, w)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def add_opacities(arr: np.ndarray, seed: int = 0, count: int = 3) -> np.ndarray:
    """Bright blotches in the lung fields, a crude stand-in for pneumonia."""
    rng = np.random.default_rng(seed + 10_000)
    h, w = arr.shape
    v, u = _unit_grid(h, w)
    out = arr.astype(np.float32)
    for _ in range(count):
        cu, cv = LUNGS[int(rng.integers(2))]
        bu = cu + rng.uniform(-0.07, 0.07)
        bv = cv + rng.uniform(-0.15, 0.15)
        sigma = rng.uniform(0.05, 0.08)
        out += rng.uniform(80, 110) * np.exp(-((u - bu) ** 2 + (v - bv) ** 2) / (2 * sigma**2))
    return np.clip(out, 0, 255).astype(np.uint8)


def gradient16_array(h: int = 64, w: int = 256, low: int = 1000, high: int = 3000) -> np.ndarray:
    """A left-to-right uint16 ramp from low to high (each column one value)."""
    row = np.linspace(low, high, w).round().astype(np.uint16)
    return np.repeat(row[None, :], h, axis=0)


# ----------------------------------------------------------------------------- encoders


def png_bytes(arr: np.ndarray) -> bytes:
    """PNG of a uint8 (L / RGB / RGBA) or uint16 (16-bit gray) array."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(arr: np.ndarray, quality: int = 90) -> bytes:
    """JPEG of a uint8 gray (H x W) or RGB (H x W x 3) array."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


_CR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
_UID_ROOT = "1.2.826.0.1.3680043.8.498.7701."  # fixed UIDs keep the bytes deterministic


def _dicom_dataset(arr: np.ndarray, *, monochrome1: bool, window, frames: int,
                   with_pixels: bool, bits: int, transfer_syntax: str | None = None):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian

    colour = arr.ndim == 3 and arr.shape[-1] == 3
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(_CR_SOP_CLASS)
    meta.MediaStorageSOPInstanceUID = UID(_UID_ROOT + "1")
    meta.TransferSyntaxUID = UID(transfer_syntax or ExplicitVRLittleEndian)
    ds = FileDataset("fixture.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = UID(_UID_ROOT + "2")
    ds.SeriesInstanceUID = UID(_UID_ROOT + "3")
    ds.Modality = "CR"
    ds.PatientName = "Test^Phantom"
    ds.PatientID = "PHANTOM"
    ds.BodyPartExamined = "CHEST"
    ds.Rows, ds.Columns = int(arr.shape[0]), int(arr.shape[1])
    if colour:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        bits = 8
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated = 16 if bits > 8 else 8
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if frames > 1:
        ds.NumberOfFrames = frames
    if with_pixels:
        dtype = "<u2" if bits > 8 else "u1"
        pixels = np.ascontiguousarray(arr).astype(dtype).tobytes()
        ds.PixelData = pixels * frames
        ds["PixelData"].VR = "OW" if bits > 8 else "OB"
    return ds


def dicom_bytes(arr16: np.ndarray, *, monochrome1: bool = False, window: tuple[float, float] | None = None,
                frames: int = 1, with_pixels: bool = True, bits: int = 16) -> bytes:
    """A conformant single-file DICOM (CR, explicit VR little endian) holding arr16.

    A H x W x 3 uint8 array gives an RGB DICOM; frames > 1 repeats the image.
    """
    ds = _dicom_dataset(arr16, monochrome1=monochrome1, window=window, frames=frames,
                        with_pixels=with_pixels, bits=bits)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def xray16_array(h: int = 128, w: int = 128, seed: int = 0) -> np.ndarray:
    """xray_like_array spread over 12 bits (0..4080), as a detector would store it."""
    return xray_like_array(h, w, seed).astype(np.uint16) * 16


def window_ramp_array(h: int = 32, w: int = 256) -> np.ndarray:
    """A uint16 ramp 0..4095 across the columns, for checking VOI windowing by hand."""
    return gradient16_array(h, w, 0, 4095)


WINDOW = (2048.0, 1000.0)  # (center, width) used by dicom_windowed()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def blank_png(width: int, height: int) -> bytes:
    """A valid 1-bit black PNG of any size, built row by row: tiny and quick even when huge."""
    row = bytes(1 + (width + 7) // 8)  # filter byte 0 + packed zero bits
    compressor = zlib.compressobj(9)
    rows_per_block = max(1, (1 << 22) // len(row))
    block = row * rows_per_block
    parts = [compressor.compress(block) for _ in range(height // rows_per_block)]
    parts.append(compressor.compress(row * (height % rows_per_block)))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", b"".join(parts)) + _png_chunk(b"IEND", b""))


# ----------------------------------------------------------------------------- good uploads


def xray_jpeg() -> bytes:
    """An ordinary grayscale chest-X-ray-like JPEG."""
    return jpeg_bytes(xray_like_array(256, 256))


def xray_png() -> bytes:
    return png_bytes(xray_like_array(256, 256))


def xray_dicom() -> bytes:
    return dicom_bytes(xray16_array())


def large_jpeg() -> bytes:
    """2000 x 1600 (width x height), big enough for JPEG draft reduction."""
    return jpeg_bytes(xray_like_array(1600, 2000), quality=85)


def png16() -> bytes:
    """16-bit grayscale PNG holding gradient16_array() (values 1000..3000)."""
    return png_bytes(gradient16_array())


def rgba_png() -> bytes:
    """RGBA of xray_like_array(128, 128): alpha 255 on the left half, 0 on the right
    half, and 128 in rows 0..31 of the left half."""
    gray = xray_like_array(128, 128)
    alpha = np.full((128, 128), 255, dtype=np.uint8)
    alpha[:, 64:] = 0
    alpha[:32, :64] = 128
    return png_bytes(np.dstack([gray, gray, gray, alpha]))


def la_png() -> bytes:
    """Gray + alpha, same alpha pattern as rgba_png()."""
    gray = xray_like_array(128, 128)
    alpha = np.full((128, 128), 255, dtype=np.uint8)
    alpha[:, 64:] = 0
    alpha[:32, :64] = 128
    buf = io.BytesIO()
    Image.merge("LA", [Image.fromarray(gray), Image.fromarray(alpha)]).save(buf, "PNG")
    return buf.getvalue()


def cmyk_jpeg() -> bytes:
    """CMYK JPEG of xray_like_array(128, 128) using only the black plate (K = 255 - gray)."""
    gray = xray_like_array(128, 128)
    zero = np.zeros_like(gray)
    image = Image.merge("CMYK", [Image.fromarray(c) for c in (zero, zero, zero, 255 - gray)])
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95)
    return buf.getvalue()


EXIF_STORED_SHAPE = (96, 160)  # (height, width) as stored; displayed as 160 x 96 (h x w)
EXIF_MARKER = 24  # a white square of this side in the stored top-left corner


def exif_rotated_jpeg() -> bytes:
    """A 160 x 96 (w x h) dark JPEG with a white marker top-left, stored with
    EXIF Orientation 6 (display = rotate 90 degrees clockwise), so the marker
    is displayed top-right and the displayed image is 96 wide, 160 high."""
    arr = np.full(EXIF_STORED_SHAPE, 30, dtype=np.uint8)
    arr[:EXIF_MARKER, :EXIF_MARKER] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def palette_levels() -> tuple[np.ndarray, np.ndarray]:
    """(indices, expected gray) for palette_png(): palette entry k is gray 255 - 4k."""
    indices = (xray_like_array(128, 128) // 4).astype(np.uint8)
    return indices, (255 - 4 * indices.astype(np.int16)).astype(np.uint8)


def palette_png() -> bytes:
    """Palette (P) PNG whose palette is an inverted gray ramp, so raw indices are wrong."""
    indices, _ = palette_levels()
    image = Image.frombytes("P", (indices.shape[1], indices.shape[0]), indices.tobytes())
    palette = []
    for k in range(256):
        level = max(0, 255 - 4 * k)
        palette += [level, level, level]
    image.putpalette(palette)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def bilevel_png() -> bytes:
    """1-bit PNG: black left half, white right half."""
    arr = np.zeros((64, 64), dtype=bool)
    arr[:, 32:] = True
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def gray_rgb_jpeg() -> bytes:
    """A grayscale X-ray saved as a 3-channel RGB JPEG (must not be called a photo)."""
    gray = xray_like_array(256, 256)
    return jpeg_bytes(np.dstack([gray, gray, gray]))


def colour_photo() -> bytes:
    """A colourful 'holiday photo': blue sky, green grass, a red and yellow ball."""
    h, w = 192, 256
    v, u = _unit_grid(h, w)
    img = np.zeros((h, w, 3), dtype=np.float32)
    sky = np.broadcast_to(v < 0.55, (h, w))
    img[sky] = (80, 150, 235)
    img[~sky] = (40, 160, 50)
    ball = ((u - 0.6) ** 2 + ((v - 0.7) * h / w) ** 2) < 0.01
    img[ball] = (220, 30, 30)
    sun = ((u - 0.15) ** 2 + ((v - 0.15) * h / w) ** 2) < 0.004
    img[sun] = (250, 230, 40)
    return jpeg_bytes(img.astype(np.uint8))


def dicom_monochrome2() -> bytes:
    return dicom_bytes(xray16_array())


def dicom_monochrome1() -> bytes:
    """Same array as dicom_monochrome2() but MONOCHROME1 (low values bright)."""
    return dicom_bytes(xray16_array(), monochrome1=True)


def dicom_windowed() -> bytes:
    """window_ramp_array() with VOI window WINDOW (center 2048, width 1000)."""
    return dicom_bytes(window_ramp_array(), window=WINDOW, bits=12)


def dicom_8bit() -> bytes:
    return dicom_bytes(xray_like_array(128, 128), bits=8)


def dicom_rgb() -> bytes:
    """A grayscale X-ray stored as an RGB DICOM (secondary capture style)."""
    gray = xray_like_array(128, 128)
    return dicom_bytes(np.dstack([gray, gray, gray]))


def dicom_raw_dataset() -> bytes:
    """A DICOM data set with no preamble, no 'DICM' and no file meta (implicit VR):
    only recognisable as DICOM by its '.dcm' name."""
    from pydicom.filewriter import dcmwrite

    ds = _dicom_dataset(xray16_array(), monochrome1=False, window=None, frames=1,
                        with_pixels=True, bits=16)
    ds.preamble = None
    del ds.file_meta
    buf = io.BytesIO()
    dcmwrite(buf, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    return buf.getvalue()


# ----------------------------------------------------------------------------- bad uploads


def zero_bytes() -> bytes:
    return b""


def text_as_jpg() -> bytes:
    return b"Patient notes: chest X-ray requested, see attached.\n" * 20


def truncated_jpeg() -> bytes:
    """The first 40 % of a good JPEG: the header is intact, the scan data is cut off."""
    data = jpeg_bytes(xray_like_array(256, 256))
    return data[: int(len(data) * 0.4)]


@functools.lru_cache(maxsize=None)
def png_bomb() -> bytes:
    """A ~110 kB PNG that would decode to 30000 x 30000 = 900 megapixels."""
    return blank_png(30_000, 30_000)


@functools.lru_cache(maxsize=None)
def huge_image() -> bytes:
    """A genuine 10000 x 10000 (100 megapixel) black PNG."""
    return blank_png(10_000, 10_000)


def corrupt_png() -> bytes:
    """A PNG whose header is fine but whose compressed pixel stream is garbage."""
    data = bytearray(png_bytes(xray_like_array(128, 128)))
    start = data.index(b"IDAT") + 6  # keep the 2-byte zlib header
    data[start:start + 400] = b"\xff" * 400
    return bytes(data)


def tiny_image() -> bytes:
    """8 x 8 pixels, far below MIN_SIDE."""
    return png_bytes(np.full((8, 8), 128, dtype=np.uint8))


def dicom_no_pixels() -> bytes:
    return dicom_bytes(xray16_array(), with_pixels=False)


def dicom_multiframe() -> bytes:
    """Three frames (a cine / tomosynthesis-like series in one file)."""
    return dicom_bytes(xray16_array(64, 64), frames=3)


def dicom_compressed() -> bytes:
    """JPEG-LS transfer syntax with a bogus encapsulated frame: no decoder can read it."""
    from pydicom.encaps import encapsulate

    ds = _dicom_dataset(xray16_array(64, 64), monochrome1=False, window=None, frames=1,
                        with_pixels=False, bits=16, transfer_syntax="1.2.840.10008.1.2.4.80")
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(60)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dicom_truncated_pixels() -> bytes:
    """Uncompressed DICOM whose pixel data is half as long as Rows x Columns needs."""
    ds = _dicom_dataset(xray16_array(64, 64), monochrome1=False, window=None, frames=1,
                        with_pixels=True, bits=16)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# case name -> (generator, upload filename); each must be refused with ImageError
BAD_UPLOADS: dict[str, tuple[Callable[[], bytes], str]] = {
    "zero_bytes": (zero_bytes, "empty.jpg"),
    "text_as_jpg": (text_as_jpg, "notes.jpg"),
    "text_as_dcm": (text_as_jpg, "notes.dcm"),
    "truncated_jpeg": (truncated_jpeg, "cut_off.jpeg"),
    "corrupt_png": (corrupt_png, "corrupt.png"),
    "png_bomb": (png_bomb, "bomb.png"),
    "huge_image": (huge_image, "huge.png"),
    "tiny_image": (tiny_image, "tiny.png"),
    "dicom_no_pixels": (dicom_no_pixels, "report.dcm"),
    "dicom_multiframe": (dicom_multiframe, "series.dcm"),
    "dicom_compressed": (dicom_compressed, "jpegls.dcm"),
    "dicom_truncated_pixels": (dicom_truncated_pixels, "cut_off.dcm"),
}

# case name -> a lower-case word the refusal message must contain
BAD_UPLOAD_KEYWORDS: dict[str, str] = {
    "zero_bytes": "empty",
    "text_as_jpg": "not a readable image",
    "text_as_dcm": "not a readable image",
    "truncated_jpeg": "truncated",
    "corrupt_png": "damaged",
    "png_bomb": "limit",
    "huge_image": "10000 x 10000",
    "tiny_image": "8 x 8",
    "dicom_no_pixels": "no pixel data",
    "dicom_multiframe": "3 frames",
    "dicom_compressed": "not supported",
    "dicom_truncated_pixels": "incomplete",
}

# case name -> (generator, upload filename); each must load (tests check the pixels)
HANDLED_UPLOADS: dict[str, tuple[Callable[[], bytes], str]] = {
    "xray_jpeg": (xray_jpeg, "chest.jpeg"),
    "xray_png": (xray_png, "chest.png"),
    "xray_dicom": (xray_dicom, "chest.dcm"),
    "large_jpeg": (large_jpeg, "large.jpg"),
    "png16": (png16, "gradient16.png"),
    "rgba_png": (rgba_png, "rgba.png"),
    "la_png": (la_png, "gray_alpha.png"),
    "cmyk_jpeg": (cmyk_jpeg, "cmyk.jpg"),
    "exif_rotated_jpeg": (exif_rotated_jpeg, "phone.jpg"),
    "palette_png": (palette_png, "palette.png"),
    "bilevel_png": (bilevel_png, "bilevel.png"),
    "gray_rgb_jpeg": (gray_rgb_jpeg, "gray_rgb.jpg"),
    "colour_photo": (colour_photo, "holiday.jpg"),
    "dicom_monochrome1": (dicom_monochrome1, "mono1.dcm"),
    "dicom_windowed": (dicom_windowed, "windowed.dcm"),
    "dicom_8bit": (dicom_8bit, "eight_bit.dcm"),
    "dicom_rgb": (dicom_rgb, "rgb.dcm"),
    "dicom_raw_dataset": (dicom_raw_dataset, "raw.dcm"),
    "dicom_named_jpg": (xray_dicom, "chest_actually_dicom.jpg"),
}


# ----------------------------------------------------------------------------- dataset


def write_kermany_dataset(root, n_per_class=(6, 6), size: int = 64, seed: int = 0,
                          splits=("train",), patients_per_class=None) -> Path:
    """Write a tiny dataset in the Kermany layout and return root.

    root/<split>/NORMAL/IM-<id:04d>-000<k>.jpeg and
    root/<split>/PNEUMONIA/person<id>_{bacteria|virus}_<k>.jpeg; n_per_class is
    (normal, pneumonia) images per split, spread over patients_per_class
    patients (an int or a (normal, pneumonia) pair; default two images each).
    Pneumonia images carry bright lung opacities so a tiny net can learn them.
    Patient ids never repeat across splits.
    """
    root = Path(root)
    counts = (n_per_class, n_per_class) if isinstance(n_per_class, int) else tuple(n_per_class)
    if patients_per_class is None:
        patients = tuple(max(1, (n + 1) // 2) for n in counts)
    elif isinstance(patients_per_class, int):
        patients = (patients_per_class, patients_per_class)
    else:
        patients = tuple(patients_per_class)
    image_seed = seed * 100_003
    for split_index, split in enumerate(splits):
        for label, n_images, n_patients in (("NORMAL", counts[0], patients[0]),
                                            ("PNEUMONIA", counts[1], patients[1])):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            first_id = 1 + split_index * 1000 + (seed % 7) * 10
            per_patient = [0] * n_patients
            for i in range(n_images):
                p = i % n_patients
                per_patient[p] += 1
                patient_id, k = first_id + p, per_patient[p]
                image_seed += 1
                arr = xray_like_array(size, size, seed=image_seed)
                if label == "NORMAL":
                    name = f"IM-{patient_id:04d}-{k:04d}.jpeg"
                else:
                    arr = add_opacities(arr, seed=image_seed)
                    kind = "virus" if patient_id % 3 == 0 else "bacteria"
                    name = f"person{patient_id}_{kind}_{k}.jpeg"
                (folder / name).write_bytes(jpeg_bytes(arr, quality=92))
    return root


REAL_XRAY = Path(__file__).resolve().parent / "data" / "person100_bacteria_475.jpeg"  # see data/README.md


def real_xray(width: int | None = None, height: int | None = None, noise: float = 0.0, seed: int = 0) -> bytes:
    """A real chest X-ray of the official test split (JPEG bytes), enlarged to width x height and with
    Gaussian noise of std `noise` grey levels when asked (distinct files the shipped weights accept)."""
    if width is None:
        return REAL_XRAY.read_bytes()
    picture = np.asarray(Image.open(REAL_XRAY).convert("L").resize((width, height), Image.Resampling.BICUBIC),
                         dtype=np.float32)
    if noise:
        picture = picture + np.random.default_rng(seed).normal(0, noise, picture.shape)
    return jpeg_bytes(picture.clip(0, 255).astype(np.uint8))
