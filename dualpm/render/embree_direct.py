"""Embree 4 through ctypes: the mesh handed over as shared numpy buffers, rays cast in packets of 16.

Why not embreex alone: its `TriangleMesh` copies vertices and indices into Embree's buffers element by
element through untyped numpy indexing, a Python-level loop that costs ~30 ms for a 20k-triangle mesh,
more than Embree's BVH build and all the rays of one dual point map together. Here Embree reads our
arrays in place (`rtcSetSharedGeometryBuffer`), and rays go through `rtcIntersect16` (Embree 4 has no
stream API): all rays are packed by a few vectorised numpy writes into 64-byte-aligned RTCRayHit16
packets, then one ctypes call per packet.

The library is the one the embreex wheel ships (`embreex.libs/libembree4-*.so.4`, no compiler needed).
`load()` checks its major version and, by casting a known packet, the ray/hit layout assumed here; if
anything fails it logs one line and returns None, and `dualpm.render.embree.triangle_scene` uses embreex.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import importlib.util
import logging
import math
import os
from ctypes import c_char_p, c_int, c_size_t, c_ssize_t, c_uint, c_void_p

import numpy as np

log = logging.getLogger(__name__)

# RTCRayHit16 in rows of 16 32-bit words (lanes): RTCRay16 (12 rows), RTCHit16 up to geomID (7 rows), then
# instID[RTC_MAX_INSTANCE_LEVEL_COUNT] (+ instPrimID where instance arrays are enabled), never read here:
# 16 spare rows (up to 8 levels of both) keep whatever a build writes there inside our packet. 16 lanes
# even where the CPU has no native 16-wide packets: on an AVX2 EPYC they traced as fast as 8-wide ones
# (which are native there), with half the calls.
LANES = 16
ORG, TNEAR, DIR, TIME, TFAR, MASK, RAY_ID, FLAGS = 0, 3, 4, 7, 8, 9, 10, 11
U, V, PRIM_ID, GEOM_ID = 15, 16, 17, 18
ROWS = 19 + 16
INVALID_ID = 0xFFFFFFFF
# enums of rtcore_device.h, rtcore_scene.h, rtcore_geometry.h, rtcore_buffer.h, rtcore_common.h
DEVICE_PROPERTY_VERSION = 0
SCENE_FLAG_ROBUST, GEOMETRY_TYPE_TRIANGLE = 1 << 2, 0
BUFFER_TYPE_INDEX, BUFFER_TYPE_VERTEX, FORMAT_UINT3, FORMAT_FLOAT3 = 0, 1, 0x5003, 0x9003


def library_path() -> str | None:
    """Path of the Embree 4 library inside the installed embreex wheel, or None."""
    spec = importlib.util.find_spec("embreex")
    if spec is None or not spec.submodule_search_locations:
        return None
    site = os.path.dirname(next(iter(spec.submodule_search_locations)))
    found = sorted(glob.glob(os.path.join(site, "embreex.libs", "libembree4*.so*")))
    return found[0] if found else None


class Embree:
    """The bound library and one device (released with the last reference; `load()` keeps one per process)."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        signatures = {
            "rtcNewDevice": (c_void_p, [c_char_p]),
            "rtcReleaseDevice": (None, [c_void_p]),
            "rtcGetDeviceProperty": (c_ssize_t, [c_void_p, c_int]),
            "rtcGetDeviceError": (c_int, [c_void_p]),
            "rtcNewScene": (c_void_p, [c_void_p]),
            "rtcSetSceneFlags": (None, [c_void_p, c_int]),
            "rtcCommitScene": (None, [c_void_p]),
            "rtcReleaseScene": (None, [c_void_p]),
            "rtcNewGeometry": (c_void_p, [c_void_p, c_int]),
            "rtcSetSharedGeometryBuffer": (None, [c_void_p, c_int, c_uint, c_int, c_void_p, c_size_t, c_size_t,
                                                  c_size_t]),
            "rtcCommitGeometry": (None, [c_void_p]),
            "rtcAttachGeometry": (c_uint, [c_void_p, c_void_p]),
            "rtcReleaseGeometry": (None, [c_void_p]),
            "rtcIntersect16": (None, [c_void_p, c_void_p, c_void_p, c_void_p]),
        }
        for name, (restype, argtypes) in signatures.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        self.lib = lib
        self.device = lib.rtcNewDevice(None)
        if not self.device:
            raise OSError(f"rtcNewDevice failed (error {lib.rtcGetDeviceError(None)})")
        self.version = lib.rtcGetDeviceProperty(self.device, DEVICE_PROPERTY_VERSION)  # e.g. 40400

    def check(self) -> None:
        """Raise RuntimeError if the device reports an error since the last check."""
        code = self.lib.rtcGetDeviceError(self.device)
        if code:
            raise RuntimeError(f"Embree error {code} (rtcore_device.h RTCError)")

    def __del__(self):
        if getattr(self, "device", None):
            self.lib.rtcReleaseDevice(self.device)


def _aligned(shape: tuple[int, ...], dtype) -> np.ndarray:
    """Uninitialised array whose data starts on a 64-byte boundary."""
    size = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.empty(size + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start : start + size].view(dtype).reshape(shape)


class TriangleScene:
    """A robust Embree scene of one triangle mesh whose buffers Embree reads in place.

    robust: watertight intersection (RTC_SCENE_FLAG_ROBUST, as `embreex.EmbreeScene(robust=True)`), so a
    ray through a shared edge cannot slip between triangles.

    Args:
        embree: the loaded library (`load()`).
        verts: (V, 3) float vertices (copied to float32 with the padding Embree's 16-byte loads need).
        faces: (F, 3) int triangles, each index in [0, V) (copied to uint32).
    """

    def __init__(self, embree: Embree, verts: np.ndarray, faces: np.ndarray):
        faces = np.asarray(faces).reshape(-1, 3)
        verts = np.asarray(verts).reshape(-1, 3)
        if faces.size and (faces.min() < 0 or faces.max() >= len(verts)):
            raise ValueError(f"triangle indices outside [0, {len(verts)})")
        self.embree, lib = embree, embree.lib
        # Embree reads 16 bytes at the last vertex (buffer padding rule): one float more than 3V
        self.verts = np.zeros(3 * len(verts) + 1, np.float32)
        self.verts[:-1] = verts.ravel()
        self.faces = np.ascontiguousarray(faces, dtype=np.uint32)
        self.scene = lib.rtcNewScene(embree.device)
        lib.rtcSetSceneFlags(self.scene, SCENE_FLAG_ROBUST)
        if len(self.faces):  # an empty scene simply has no geometry: every ray misses
            geometry = lib.rtcNewGeometry(embree.device, GEOMETRY_TYPE_TRIANGLE)
            lib.rtcSetSharedGeometryBuffer(geometry, BUFFER_TYPE_VERTEX, 0, FORMAT_FLOAT3, self.verts.ctypes.data,
                                           0, 12, len(verts))
            lib.rtcSetSharedGeometryBuffer(geometry, BUFFER_TYPE_INDEX, 0, FORMAT_UINT3, self.faces.ctypes.data,
                                           0, 12, len(self.faces))
            lib.rtcCommitGeometry(geometry)
            lib.rtcAttachGeometry(self.scene, geometry)
            lib.rtcReleaseGeometry(geometry)  # the scene holds it now
        lib.rtcCommitScene(self.scene)  # builds the BVH
        embree.check()

    def __del__(self):
        if getattr(self, "scene", None):
            self.embree.lib.rtcReleaseScene(self.scene)

    def intersect(self, origins: np.ndarray, directions: np.ndarray, t_near: np.ndarray | float,
                  t_far: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Closest hit of each ray o + t d, t_near <= t <= t_far.

        Args:
            origins, directions: (n, 3) float32 (other floats are converted), scene units; directions need
                not be unit length (t is then in units of |d|).
            t_near, t_far: (n,) float (or one number for t_near), start and end of each ray segment in
                units of its direction, 0 <= t_near.
        Returns:
            primID (n,) int32 hit triangle or -1; u, v (n,) float32 Embree barycentrics (point = (1-u-v) v0 +
            u v1 + v v2); tfar (n,) float32 hit distance, t_far where the ray missed. u, v undefined on misses.
        """
        packets = self.pack(origins, directions, t_near, t_far)
        self.trace(packets, len(origins))
        return self.unpack(packets, len(origins))

    def pack(self, origins: np.ndarray, directions: np.ndarray, t_near: np.ndarray | float,
             t_far: np.ndarray) -> np.ndarray:
        """(ceil(n / 16), ROWS, 16) float32 RTCRayHit16 packets, 64-byte aligned; lanes past n hold zero rays."""
        n = len(origins)
        count = -(-n // LANES)
        rays = np.zeros((TFAR + 1, count * LANES), np.float32)  # time = 0
        rays[ORG : ORG + 3, :n] = np.asarray(origins).T
        rays[DIR : DIR + 3, :n] = np.asarray(directions).T
        rays[TNEAR, :n] = t_near
        rays[TFAR, :n] = t_far
        packets = _aligned((count, ROWS, LANES), np.float32)
        packets[:, : TFAR + 1] = rays.reshape(TFAR + 1, count, LANES).transpose(1, 0, 2)
        words = packets.view(np.uint32)
        words[:, MASK] = INVALID_ID  # every mask bit set
        words[:, RAY_ID : FLAGS + 1] = 0
        words[:, PRIM_ID : GEOM_ID + 1] = INVALID_ID  # misses leave the hit untouched: primID reads -1
        return packets

    def trace(self, packets: np.ndarray, n: int) -> None:
        """Intersect the first n rays of `pack`'s packets in place, one library call per packet."""
        valid = _aligned((2, LANES), np.int32)  # all lanes; the last packet's first n mod 16 lanes
        valid[0] = -1
        valid[1] = np.where(np.arange(LANES) < n - (len(packets) - 1) * LANES, -1, 0)
        call, scene, base, stride = self.embree.lib.rtcIntersect16, self.scene, packets.ctypes.data, packets.strides[0]
        full, last = valid[0].ctypes.data, valid[1].ctypes.data
        for p in range(len(packets) - 1):
            call(full, scene, base + p * stride, None)
        if len(packets):
            call(last, scene, base + (len(packets) - 1) * stride, None)

    @staticmethod
    def unpack(packets: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(primID, u, v, tfar) of the first n rays of traced packets (see `intersect`)."""
        fields = packets[:, [PRIM_ID, U, V, TFAR]].transpose(1, 0, 2).reshape(4, -1)[:, :n]  # (4, n) copy
        return fields[0].view(np.int32), fields[1], fields[2], fields[3]


@functools.cache
def load() -> Embree | None:
    """The Embree 4 library of the embreex wheel, bound and checked once per process; None (and one
    logged line) if it is missing, not Embree 4, or does not return a known hit where this module expects it."""
    path = library_path()
    try:
        if path is None:
            raise OSError("no embreex.libs/libembree4*.so* beside the installed embreex")
        embree = Embree(path)
        if embree.version // 10000 != 4:
            raise OSError(f"{path} is Embree {embree.version}, not 4.x")
        _self_test(embree)
    except (OSError, AttributeError, RuntimeError, ValueError) as err:
        log.warning("direct Embree binding unavailable (%s); casting rays through embreex", err)
        return None
    return embree


def _self_test(embree: Embree) -> None:
    """Cast 17 rays at the triangle (0,0,1) (1,0,1) (0,1,1): every other one hits at (u, v) = (0.25, 0.5),
    t = 2 (direction length 0.5); the rest miss (aimed outside, or a segment ending before or starting after
    the triangle).
    Checks the fields read back and that Embree wrote nothing into the last spare row of a packet."""
    scene = TriangleScene(embree, np.array([[0, 0, 1], [1, 0, 1], [0, 1, 1]]), np.array([[0, 1, 2]]))
    n = LANES + 1
    hits = np.arange(n) % 2 == 0
    aimed = hits | (np.arange(n) == 1) | (np.arange(n) == 3)  # 1 ends at t = 1, 3 starts at t = 2.5
    origins = np.where(aimed[:, None], [0.25, 0.5, 0.0], [2.0, 2.0, 0.0])
    directions = np.tile([0.0, 0.0, 0.5], (n, 1))
    t_near = np.where(np.arange(n) == 3, 2.5, np.where(hits, 1.5, 0.0)).astype(np.float32)
    t_far = np.where(np.arange(n) == 1, 1.0, 10.0).astype(np.float32)
    packets = scene.pack(origins, directions, t_near, t_far)
    packets[:, -1] = 7.0
    scene.trace(packets, n)
    prim, u, v, t = scene.unpack(packets, n)
    ok = (np.array_equal(prim, np.where(hits, 0, -1)) and np.allclose(u[hits], 0.25, atol=1e-6)
          and np.allclose(v[hits], 0.5, atol=1e-6) and np.allclose(t[hits], 2.0, atol=1e-6)
          and np.array_equal(t[~hits], t_far[~hits]) and (packets[:, -1] == 7.0).all())
    if not ok:
        raise RuntimeError(f"Embree {embree.version}: RTCRayHit16 not laid out as expected")
