"""Point-cloud files -> float32 (N, 3) or (N, 6) arrays for the points encoder (used by the CLI and the API).

Formats (by file suffix for a path; by content for bytes):
    .npy   numpy array (N, 3) xyz or (N, 6) xyz + colour/normals, any numeric dtype (no pickles)
    .ply   ASCII or binary little-endian PLY; the vertex element's x, y, z and, when present, nx, ny, nz
           (normals) or red, green, blue (colour, scaled to [0, 1] when stored as integers)
    .xyz   whitespace-separated columns, 3 (xyz) or 6 per line; blank lines and '#' comments skipped
Every problem is a one-line ValueError that says what was wrong; the array is then checked by
points.validate_points (empty, NaN, too many points) when it reaches the encoder.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
             "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
             "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}
FORMATS = ("npy", "ply", "xyz")


def load_points(source, format: str | None = None) -> np.ndarray:
    """A path (str / Path) or the bytes of a .npy, .ply or .xyz file -> float32 (N, 3) or (N, 6).

    format: "npy", "ply" or "xyz" to override the detection (a path's suffix, else the bytes' magic:
    b"\\x93NUMPY" is .npy, b"ply" is .ply, anything else is read as .xyz text)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"point-cloud file not found: {path}")
        data = path.read_bytes()
        format = format or path.suffix.lower().lstrip(".")
        if format not in FORMATS:
            raise ValueError(f"unsupported point-cloud file {path.name!r}: expected .npy, .ply or .xyz")
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        raise ValueError(f"load_points takes a path or bytes, got {type(source).__name__}")
    if not data:
        raise ValueError("point-cloud file is empty (0 bytes)")
    if format is None:
        format = "npy" if data[:6] == b"\x93NUMPY" else "ply" if data[:3] == b"ply" else "xyz"
    if format not in FORMATS:
        raise ValueError(f"unsupported point-cloud format {format!r}: expected one of {FORMATS}")
    arr = {"npy": _read_npy, "ply": _read_ply, "xyz": _read_xyz}[format](data)
    if arr.ndim != 2 or arr.shape[1] not in (3, 6):
        raise ValueError(f"point cloud must be (N, 3) xyz or (N, 6) xyz + colour/normals, got {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError("point-cloud file holds no points")
    if not np.isfinite(arr).all():
        raise ValueError("point-cloud file contains NaN or infinite coordinates")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _read_npy(data: bytes) -> np.ndarray:
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy file: it does not start with the numpy magic bytes")
    try:
        a = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:  # object arrays need pickles, which are refused
        raise ValueError(f"unreadable .npy file: {str(e).splitlines()[0]}") from None
    except (OSError, EOFError):
        raise ValueError("unreadable .npy file: truncated or corrupt") from None
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool) or np.iscomplexobj(a):
        raise ValueError(f".npy point cloud must be a real numeric array, got dtype {a.dtype}")
    return a.astype(np.float32)


def _read_xyz(data: bytes) -> np.ndarray:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(".xyz file is not UTF-8 text (binary data?)") from None
    rows, width = [], None
    for no, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.replace(",", " ").split()
        if len(parts) not in (3, 6):
            raise ValueError(f".xyz line {no} has {len(parts)} columns: expected 3 (xyz) or 6 (xyz + 3 more)")
        if width is not None and len(parts) != width:
            raise ValueError(f".xyz line {no} has {len(parts)} columns, earlier lines have {width}")
        width = len(parts)
        try:
            rows.append([float(p) for p in parts])
        except ValueError:
            raise ValueError(f".xyz line {no} is not numeric: {line[:60]!r}") from None
    if not rows:
        raise ValueError(".xyz file holds no points")
    return np.asarray(rows, dtype=np.float64)


def _read_ply(data: bytes) -> np.ndarray:
    end = data.find(b"end_header")
    if data[:3] != b"ply" or end < 0:
        raise ValueError("not a PLY file: expected a 'ply' header ending in 'end_header'")
    nl = data.find(b"\n", end)
    body = data[nl + 1:] if nl >= 0 else b""
    try:
        header = data[:end].decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise ValueError("PLY header is not ASCII text") from None
    fmt, elements = None, []  # elements: [name, count, [(prop name, dtype or None for lists)]]
    for line in header[1:]:
        w = line.split()
        if not w or w[0] in ("comment", "obj_info"):
            continue
        if w[0] == "format" and len(w) >= 2:
            fmt = w[1]
        elif w[0] == "element" and len(w) == 3 and w[2].isdigit():
            elements.append([w[1], int(w[2]), []])
        elif w[0] == "property" and elements:
            if len(w) == 5 and w[1] == "list":
                elements[-1][2].append((w[4], (PLY_TYPES.get(w[2]), PLY_TYPES.get(w[3]))))
            elif len(w) == 3 and w[1] in PLY_TYPES:
                elements[-1][2].append((w[2], PLY_TYPES[w[1]]))
            else:
                raise ValueError(f"PLY header has an unsupported property line: {line.strip()!r}")
        else:
            raise ValueError(f"PLY header has an unreadable line: {line.strip()!r}")
    if fmt not in ("ascii", "binary_little_endian"):
        raise ValueError(f"unsupported PLY format {fmt!r}: expected ascii or binary_little_endian")
    names = [e[0] for e in elements]
    if "vertex" not in names:
        raise ValueError("PLY file has no vertex element")
    before = elements[:names.index("vertex")]
    vertex = elements[names.index("vertex")]
    props = [p for p, _ in vertex[2]]
    if not {"x", "y", "z"} <= set(props):
        raise ValueError(f"PLY vertex element lacks x, y, z properties (has {props})")
    if any(isinstance(t, tuple) for _, t in vertex[2]):
        raise ValueError("PLY vertex element has list properties: only scalar vertex properties are supported")
    if fmt == "ascii":
        lines = body.decode("ascii", errors="replace").split("\n")
        skip = sum(e[1] for e in before)  # elements before the vertices, one line each
        rows = [ln.split() for ln in lines[skip:skip + vertex[1]]]
        if len(rows) < vertex[1] or any(len(r) < len(props) for r in rows):
            raise ValueError(f"PLY body is truncated: expected {vertex[1]} vertex lines of {len(props)} values")
        try:
            table = np.asarray([[float(v) for v in r[:len(props)]] for r in rows], dtype=np.float64)
        except ValueError:
            raise ValueError("PLY vertex data is not numeric") from None
        cols = {p: table[:, i] for i, p in enumerate(props)}
    else:
        if any(isinstance(t, tuple) for e in before for _, t in e[2]):
            raise ValueError("PLY elements before the vertices have list properties: not supported in binary")
        offset = sum(e[1] * sum(np.dtype("<" + t).itemsize for _, t in e[2]) for e in before)
        dt = np.dtype([(p, "<" + t) for p, t in vertex[2]])
        if len(body) < offset + vertex[1] * dt.itemsize:
            raise ValueError(f"PLY body is truncated: {len(body)} bytes, need {offset + vertex[1] * dt.itemsize} "
                             f"for {vertex[1]} vertices")
        rec = np.frombuffer(body, dt, count=vertex[1], offset=offset)
        cols = {p: rec[p].astype(np.float64) for p in props}
    types = dict(vertex[2])
    out = [cols["x"], cols["y"], cols["z"]]
    if {"nx", "ny", "nz"} <= set(props):
        out += [cols["nx"], cols["ny"], cols["nz"]]
    elif {"red", "green", "blue"} <= set(props):
        for c in ("red", "green", "blue"):
            t = types[c]
            out.append(cols[c] / float(np.iinfo(t).max) if np.dtype(t).kind in "iu" else cols[c])
    return np.stack(out, 1)
