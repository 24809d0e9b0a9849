"""Header checks of image files before ITK reads them: what ITK would repair or misread silently.

ITK (SimpleITK 2.x) reads a zero or NaN spacing as 1 mm, zero-fills a truncated NIfTI file, and
takes colour (RGB) or complex pixels for vector images, which would then pass for echoes. These
checks read the header of a NRRD, MetaImage or NIfTI file themselves (text headers by hand,
NIfTI with nibabel) and refuse such a file with one line naming it and the problem. Units: mm.
"""

from __future__ import annotations

import math
import os
import re
import zlib
from pathlib import Path

import numpy as np

from KneeSegLogic.errors import CancelledError, InputError, one_line

# Longest text header read (NRRD and MetaImage headers are a few hundred bytes).
HEADER_LIMIT = 1 << 16

# NRRD "kinds" and NIfTI datatypes that are not a magnitude image.
_COLOUR_KINDS = {"rgb-color", "rgba-color", "hsv-color", "xyz-color", "3-color", "4-color"}
_NRRD_TYPE_BYTES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t"), 2),
    **dict.fromkeys(("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "int64", "int64_t"), 8),
    **dict.fromkeys(("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"), 8),
    "float": 4,
    "double": 8,
}
_MET_TYPE_BYTES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_LONG": 4,
    "MET_ULONG": 4,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}


def check_image_header(path: str | Path) -> None:
    """Refuse an image file whose header says it cannot be a correct magnitude scan.

    Raises
    ------
    InputError
        Spacing (or a space direction) zero, negative or not a number; colour or complex pixels;
        pixel data shorter than the header declares (a truncated file).
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".nrrd", ".nhdr")):
        _check_nrrd(path)
    elif name.endswith((".mha", ".mhd")):
        _check_metaimage(path)
    elif name.endswith((".nii", ".nii.gz")):
        _check_nifti(path)


def _text_header(path: Path, separator: bytes) -> tuple[list[str], int] | None:
    """Header lines and the byte offset where data start (None when no separator is found)."""
    with open(path, "rb") as stream:
        head = stream.read(HEADER_LIMIT)
    end = head.find(separator)
    if end < 0:
        return None
    text = head[:end].decode("latin-1")
    return text.splitlines(), end + len(separator)


def _check_spacing(path: Path, spacing: list[float], what: str) -> None:
    bad = [s for s in spacing if not (math.isfinite(s) and s > 0)]
    if bad:
        raise InputError(path, f"{what} {spacing} is zero, negative or not a number; the voxel size is unknown")


def _numbers(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"[-+]?(?:nan|inf|\d+\.?\d*(?:e[-+]?\d+)?|\.\d+(?:e[-+]?\d+)?)", text, re.I)]


def _check_nrrd(path: Path) -> None:
    with open(path, "rb") as stream:
        magic = stream.read(8)
    if not magic.startswith(b"NRRD"):
        raise InputError(path, "is not a NRRD file (no NRRD magic at its start)")
    # The header ends at the first blank line; a detached header (.nhdr) may have none.
    found = _text_header(path, b"\n\n")
    if found is None:
        found = (Path(path).read_text(encoding="latin-1").splitlines(), -1)
    lines, offset = found
    fields = {}
    for line in lines[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.lstrip("=").strip()
    kinds = fields.get("kinds", "").lower().split()
    if any(k in _COLOUR_KINDS for k in kinds):
        raise InputError(path, "is a colour (RGB) image; a greyscale MR scan is needed")
    if "complex" in kinds:
        raise InputError(path, "holds complex-valued voxels; a magnitude image is needed")
    try:
        if "space directions" in fields:
            vectors = re.findall(r"\(([^)]*)\)", fields["space directions"])
            norms = [float(np.linalg.norm(_numbers(v))) if _numbers(v) else float("nan") for v in vectors]
            _check_spacing(path, norms, "space directions have lengths")
        elif "spacings" in fields:
            spacings = [float(v) for v in fields["spacings"].split()]
            domain = [s for s, k in zip(spacings, kinds or ["domain"] * len(spacings)) if k in ("domain", "space")]
            _check_spacing(path, domain, "spacings")
        sizes = [int(v) for v in fields.get("sizes", "").split()]
    except ValueError:
        raise InputError(path, "NRRD header has unreadable sizes or spacing") from None
    encoding = fields.get("encoding", "raw").lower()
    element = _NRRD_TYPE_BYTES.get(fields.get("type", "").lower())
    if offset < 0 or "data file" in fields or "datafile" in fields or element is None or not sizes:
        return  # detached data: ITK checks what it reads
    skip = int(fields.get("byte skip", "0") or 0)
    if encoding == "raw" and skip >= 0:
        available = os.path.getsize(path) - offset - skip
        _check_length(path, available, int(np.prod(sizes, dtype=np.float64)) * element)
    elif encoding in ("gzip", "gz"):
        _check_length(path, _gzip_length(path, offset), int(np.prod(sizes, dtype=np.float64)) * element)


def _check_metaimage(path: Path) -> None:
    found = _text_header(path, b"ElementDataFile")
    if found is None:
        raise InputError(path, "is not a MetaImage file (no ElementDataFile in its header)")
    lines, offset = found
    with open(path, "rb") as stream:
        stream.seek(offset)
        rest = stream.read(HEADER_LIMIT).split(b"\n", 1)
    data_file = rest[0].decode("latin-1").lstrip(" =").strip()
    fields = {}
    for line in lines:
        key, _, value = line.partition("=")
        fields[key.strip().lower()] = value.strip()
    try:
        if "elementspacing" in fields:
            _check_spacing(path, _numbers(fields["elementspacing"]), "ElementSpacing")
        sizes = [int(v) for v in fields.get("dimsize", "").split()]
        channels = int(fields.get("elementnumberofchannels", "1") or 1)
    except ValueError:
        raise InputError(path, "MetaImage header has unreadable DimSize or ElementSpacing") from None
    element = _MET_TYPE_BYTES.get(fields.get("elementtype", "").upper())
    compressed = fields.get("compresseddata", "false").lower() == "true"
    if data_file.upper() != "LOCAL" or element is None or not sizes or compressed or len(rest) < 2:
        return  # separate data file or zlib data: ITK's reader reports those errors
    available = os.path.getsize(path) - (offset + len(rest[0]) + 1)
    _check_length(path, available, int(np.prod(sizes, dtype=np.float64)) * element * channels)


def _check_nifti(path: Path) -> None:
    import nibabel

    # The header as stored, read without nibabel's checks: nibabel.load would "fix" a zero pixdim
    # (and log that on stderr) before we see it.
    try:
        with nibabel.openers.ImageOpener(str(path)) as stream:
            start = stream.read(4)
            stream.seek(0)
            sizes = {int.from_bytes(start, "little"), int.from_bytes(start, "big")}
            kind = nibabel.Nifti2Header if 540 in sizes else nibabel.Nifti1Header
            header = kind.from_fileobj(stream, check=False)
    except CancelledError:  # SIGTERM/Ctrl-C raised inside nibabel or gzip: a stop, not a broken header
        raise
    except Exception as error:  # nibabel and gzip raise many kinds for a broken header
        raise InputError(path, f"cannot be read as an image (NIfTI header: {one_line(error, 200)})") from None
    dtype = header.get_data_dtype()
    if dtype.names is not None:  # RGB24 / RGBA32 are structured dtypes
        raise InputError(path, "is a colour (RGB) image; a greyscale MR scan is needed")
    if dtype.kind == "c":
        raise InputError(path, "holds complex-valued voxels; a magnitude image is needed")
    shape = header.get_data_shape()
    spatial = min(3, len(shape))
    _check_spacing(path, [float(z) for z in header["pixdim"][1 : spatial + 1]], "pixdim (voxel size)")
    offset = int(header.get_data_offset())
    needed = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if path.name.lower().endswith(".gz"):
        _check_length(path, _gzip_length(path, 0) - offset, needed)
    else:
        _check_length(path, os.path.getsize(path) - offset, needed)


def _gzip_length(path: Path, offset: int) -> int:
    """Bytes that decompress from the gzip stream starting at ``offset`` (-1 if it is corrupt or cut)."""
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    total = 0
    with open(path, "rb") as stream:
        stream.seek(offset)
        for block in iter(lambda: stream.read(1 << 20), b""):
            try:
                total += len(inflate.decompress(block))
            except zlib.error:
                return -1
            if inflate.eof:
                break
    return total if inflate.eof else -1


def _check_length(path: Path, available: int, needed: int) -> None:
    if available < 0:
        raise InputError(path, "compressed pixel data are cut short or corrupt (a truncated file)")
    if available < needed:
        raise InputError(
            path, f"pixel data are truncated: {available:,} of {needed:,} bytes present ({available / needed:.0%})"
        )
