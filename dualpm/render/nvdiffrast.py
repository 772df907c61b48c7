"""CUDA backend: nvdiffrast `RasterizeCudaContext` + `DepthPeeler` + `interpolate`.

All images share one clip-space vertex tensor: instanced mode (pos (B, V, 4), one triangle list)
when the batch shares topology, range mode (pos (sum V, 4), concatenated triangles with per-image
ranges) otherwise. Each peeled layer interpolates canonical and camera-space posed positions with the
rasteriser's perspective-correct barycentrics at pixel centres, exactly what the CPU backend computes
by ray casting. The projection's negated y row makes memory row 0 the top of the image for both.
"""

from __future__ import annotations

import torch
from torch import Tensor

_CONTEXTS: dict[int, object] = {}


def _context(device: torch.device):
    import nvdiffrast.torch as dr

    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CONTEXTS:  # creating a context is slow: one per device, reused
        _CONTEXTS[index] = dr.RasterizeCudaContext(device=torch.device("cuda", index))
    return _CONTEXTS[index]


def _clip(points_cam: Tensor, projection: Tensor) -> Tensor:
    """(..., V, 3) camera-space points, (..., 4, 4) projection -> (..., V, 4) clip coordinates."""
    homog = torch.cat([points_cam, torch.ones_like(points_cam[..., :1])], dim=-1)
    return homog @ projection.transpose(-1, -2)


@torch.no_grad()
def render_cuda(batch, projection: Tensor, height: int, width: int, num_layers: int) -> Tensor:
    """nvdiffrast backend of `dualpm.render.render_layers` (see there); returns (B, H, W, L, C + 4)."""
    import nvdiffrast.torch as dr

    device = torch.device("cuda", torch.cuda.current_device())
    ctx = _context(device)
    proj = projection.to(device, torch.float32)
    size = len(batch.faces)

    if batch.shared_topology:
        posed = torch.stack(batch.posed_camera).to(device)  # (B, V, 3)
        pos = _clip(posed, proj).contiguous()  # (B, V, 4)
        tri = batch.faces[0].to(device, torch.int32).contiguous()
        attr = torch.stack(batch.values).to(device).contiguous()  # (B, V, C + 3)
        ranges = None
    else:
        counts_v = [p.shape[0] for p in batch.posed_camera]
        counts_f = [f.shape[0] for f in batch.faces]
        v_start = torch.tensor([0] + counts_v[:-1]).cumsum(0)
        pos = torch.cat([_clip(p.to(device), proj[b]) for b, p in enumerate(batch.posed_camera)]).contiguous()
        tri = torch.cat([f + int(v_start[b]) for b, f in enumerate(batch.faces)]).to(device, torch.int32).contiguous()
        attr = torch.cat(batch.values).to(device).contiguous()  # (sum V, C + 3)
        f_start = torch.tensor([0] + counts_f[:-1]).cumsum(0)
        ranges = torch.stack([f_start, torch.tensor(counts_f)], dim=1).to(torch.int32)  # CPU, as nvdiffrast wants

    channels = attr.shape[-1]  # C + 3
    out = torch.zeros(size, height, width, num_layers, channels + 1, device=device)
    with dr.DepthPeeler(ctx, pos, tri, (height, width), ranges=ranges, grad_db=False) as peeler:
        for layer in range(num_layers):
            rast, _ = peeler.rasterize_next_layer()  # (B, H, W, 4): u, v, z/w, triangle id + 1 (0 = empty)
            covered = rast[..., 3] > 0
            if not covered.any():
                break
            values, _ = dr.interpolate(attr, rast, tri)  # (B, H, W, C + 3)
            out[..., layer, :-1] = values * covered[..., None]
            out[..., layer, -1] = covered.float()
    return out
