"""Point-cloud file readers: .npy, ASCII and binary little-endian .ply, .xyz; each bad file is one ValueError."""

import io

import numpy as np
import pytest

from deepseek.multimodal.pointfiles import load_points

RNG = np.random.default_rng(0)
XYZ = RNG.normal(size=(7, 3)).astype(np.float32)
NRM = RNG.normal(size=(7, 3)).astype(np.float32)
RGB = RNG.integers(0, 256, size=(7, 3)).astype(np.uint8)


def npy_bytes(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def ply_ascii(cols, names, extra_face=False):
    head = ["ply", "format ascii 1.0", "comment made by a test", f"element vertex {len(cols)}"]
    head += [f"property {'uchar' if n in ('red', 'green', 'blue') else 'float'} {n}" for n in names]
    if extra_face:
        head += ["element face 1", "property list uchar int vertex_indices"]
    body = [" ".join(str(int(v)) if n in ("red", "green", "blue") else f"{v:.9g}" for v, n in zip(r, names))
            for r in cols]
    if extra_face:
        body.append("3 0 1 2")
    return ("\n".join(head + ["end_header"] + body) + "\n").encode()


def ply_binary(xyz, rgb=None, nrm=None, before_vertex=False):
    names = ["x", "y", "z"]
    dt = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if nrm is not None:
        dt += [("nx", "<f4"), ("ny", "<f4"), ("nz", "<f4")]
    if rgb is not None:
        dt += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    rec = np.zeros(len(xyz), dtype=dt)
    for i, n in enumerate(names):
        rec[n] = xyz[:, i]
    if nrm is not None:
        for i, n in enumerate(("nx", "ny", "nz")):
            rec[n] = nrm[:, i]
    if rgb is not None:
        for i, n in enumerate(("red", "green", "blue")):
            rec[n] = rgb[:, i]
    head = ["ply", "format binary_little_endian 1.0"]
    pre = b""
    if before_vertex:  # an element before the vertices whose bytes the reader must skip
        head += ["element camera 1", "property double fx", "property short id"]
        pre = np.array([(1.5, 3)], dtype=[("fx", "<f8"), ("id", "<i2")]).tobytes()
    head += [f"element vertex {len(xyz)}"]
    types = {"<f4": "float", "u1": "uchar"}
    head += [f"property {types[t]} {n}" for n, t in dt]
    return ("\n".join(head + ["end_header"]) + "\n").encode() + pre + rec.tobytes()


def test_npy_path_and_bytes(tmp_path):
    p = tmp_path / "c.npy"
    np.save(p, XYZ.astype(np.float64))
    a = load_points(p)
    assert a.dtype == np.float32 and a.shape == (7, 3)
    np.testing.assert_allclose(a, XYZ, rtol=1e-6)
    six = np.concatenate([XYZ, NRM], 1)
    np.testing.assert_allclose(load_points(npy_bytes(six)), six, rtol=1e-6)
    np.testing.assert_allclose(load_points(str(p)), XYZ, rtol=1e-6)


def test_ply_ascii_xyz_normals_colour(tmp_path):
    a = load_points(ply_ascii(XYZ, ["x", "y", "z"]))
    np.testing.assert_allclose(a, XYZ, rtol=1e-6)
    n = load_points(ply_ascii(np.concatenate([XYZ, NRM], 1), ["x", "y", "z", "nx", "ny", "nz"]))
    np.testing.assert_allclose(n, np.concatenate([XYZ, NRM], 1), rtol=1e-6)
    path = tmp_path / "c.ply"
    path.write_bytes(ply_ascii(np.concatenate([XYZ, RGB], 1), ["x", "y", "z", "red", "green", "blue"],
                               extra_face=True))
    c = load_points(path)
    assert c.shape == (7, 6) and c.dtype == np.float32
    np.testing.assert_allclose(c[:, 3:], RGB / 255.0, rtol=1e-6)  # uchar colour scaled to [0, 1]
    np.testing.assert_allclose(c[:, :3], XYZ, rtol=1e-6)


def test_ply_binary_little_endian():
    np.testing.assert_array_equal(load_points(ply_binary(XYZ)), XYZ)
    n = load_points(ply_binary(XYZ, nrm=NRM, before_vertex=True))
    np.testing.assert_array_equal(n, np.concatenate([XYZ, NRM], 1))
    c = load_points(ply_binary(XYZ, rgb=RGB))
    np.testing.assert_allclose(c[:, 3:], RGB / 255.0, rtol=1e-6)
    both = load_points(ply_binary(XYZ, rgb=RGB, nrm=NRM))  # normals win over colour
    np.testing.assert_array_equal(both[:, 3:], NRM)


def test_xyz_text(tmp_path):
    lines = "# header comment\n" + "\n".join(" ".join(f"{v:.9g}" for v in r) for r in XYZ) + "\n\n"
    path = tmp_path / "c.xyz"
    path.write_text(lines)
    np.testing.assert_allclose(load_points(path), XYZ, rtol=1e-6)
    six = np.concatenate([XYZ, NRM], 1)
    text = "\n".join("\t".join(f"{v:.9g}" for v in r) for r in six).encode()
    np.testing.assert_allclose(load_points(text), six, rtol=1e-6)


def test_loaded_points_feed_the_encoder():
    from deepseek.multimodal import BindingModel, MultimodalConfig

    model = BindingModel(MultimodalConfig())
    out = model.encode("points", [load_points(ply_binary(XYZ, nrm=NRM)), load_points(npy_bytes(XYZ))])
    assert out.pooled.shape == (2, 128) and out.tokens.shape[0] == 2


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.npy", "not found"),
    (lambda d: _write(d / "c.obj", b"v 1 2 3\n"), "unsupported point-cloud file"),
    (lambda d: b"", "empty"),
    (lambda d: 3.5, "path or bytes"),
    (lambda d: npy_bytes(np.zeros((5, 4))), "(N, 3) xyz or (N, 6)"),
    (lambda d: npy_bytes(np.zeros((0, 3))), "no points"),
    (lambda d: npy_bytes(np.array([[0, 0, np.nan]])), "NaN"),
    (lambda d: npy_bytes(np.array([["a", "b", "c"]])), "real numeric"),
    (lambda d: npy_bytes(np.array([[1, 2, 3]], dtype=object)), "unreadable .npy"),
    (lambda d: npy_bytes(XYZ)[:60], "unreadable .npy"),
    (lambda d: _write(d / "c.npy", b"not numpy at all"), "numpy magic"),
    (lambda d: b"ply\nformat binary_big_endian 1.0\nelement vertex 1\nproperty float x\nend_header\n",
     "unsupported PLY format"),
    (lambda d: b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nproperty float y\nend_header\n1 2\n",
     "lacks x, y, z"),
    (lambda d: b"ply\nformat ascii 1.0\nelement face 1\nproperty list uchar int vi\nend_header\n3 0 1 2\n",
     "no vertex element"),
    (lambda d: b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\n", "end_header"),
    (lambda d: b"ply\nformat ascii 1.0\nelement vertex 1\nproperty quaternion x\nend_header\n",
     "unsupported property"),
    (lambda d: ply_ascii(XYZ, ["x", "y", "z"])[:-30], "truncated"),
    (lambda d: ply_ascii(XYZ, ["x", "y", "z"]).replace(b"end_header\n", b"end_header\nfoo bar baz\n", 1),
     "not numeric"),
    (lambda d: ply_binary(XYZ)[:-5], "truncated"),
    (lambda d: b"1 2 3\n4 5\n", "line 2 has 2 columns"),
    (lambda d: b"1 2 3\n4 5 6 7 8 9\n", "earlier lines have 3"),
    (lambda d: b"1 2 x\n", "not numeric"),
    (lambda d: b"# only a comment\n", "no points"),
    (lambda d: b"\xff\xfe\x00garbage", "not UTF-8"),
])
def test_bad_files_raise_one_line_value_errors(tmp_path, make, message):
    with pytest.raises(ValueError) as e:
        load_points(make(tmp_path))
    assert message in str(e.value) and "\n" not in str(e.value)


def _write(path, data):
    path.write_bytes(data)
    return path
