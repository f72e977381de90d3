"""Shape-as-Points voxelizer (Peng et al., NeurIPS 2021) as used by Friedrich et al. (MICCAI 2023).

Unoriented points (B, N, 3) in the unit cube -> local-pooled PointNet -> 32^3 feature grid -> 3-level
3D U-Net -> decoders predict ``num_offset`` displaced copies of every point and a normal for every
copy -> :class:`~scripts.networks.dpsr.DPSR` -> indicator grid (inside < 0, outside > 0).

Unit-cube / grid conventions are those of :mod:`scripts.networks.dpsr`. Cell ``(i, j, k)`` of the
``R^3`` feature grid covers ``[i/R, (i+1)/R) x [j/R, ...) x [k/R, ...)``; points are pooled into their
cell and features are read back with ``grid_sample(align_corners=False)``, whose samples sit at the
same cell centres (the reference pools into cells but samples with ``align_corners=True``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.nets.basic_unet import UpCat
from scipy import ndimage
from torch import nn

from .dpsr import DPSR, cube_side, nearest_node_index

__all__ = [
    "PRESETS", "SAPVoxelizer", "SAPIndicator", "LocalPoolPointNet", "LocalDecoder", "ResBlockFC", "UNet3D", "gt_indicator", "sap_loss",
]

PRESETS: dict[str, dict] = {
    # published configuration (pcdiff-implant voxelization/configs/train_skullbreak.yaml): ~1.09 M parameters
    "paper": dict(dpsr_res=512, grid_res=32, hidden_dim=32, c_dim=32, n_blocks=5, unet_levels=3, unet_features=32),
    # CPU presets (same architecture, smaller grids/widths)
    "small": dict(dpsr_res=64, grid_res=16, hidden_dim=32, c_dim=32, n_blocks=5, unet_levels=3, unet_features=16),
    "tiny": dict(dpsr_res=32, grid_res=8, hidden_dim=16, c_dim=16, n_blocks=3, unet_levels=2, unet_features=8),
}
_COMMON = dict(num_offset=7, offset_scale=1e-3, sigma=2.0, local_coord=True)


def _cell_index(points: torch.Tensor, res: int) -> torch.Tensor:
    """Points (B, N, 3) in [0, 1) -> flat cell index (B, N) of an R^3 grid laid out as (i, j, k)."""
    cell = (points.detach().clamp(0.0, 1.0 - 1e-6) * res).long()
    return (cell[..., 0] * res + cell[..., 1]) * res + cell[..., 2]


def _sample_grid(features: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinear sample of features (B, C, R, R, R) at points (B, N, 3) in [0, 1) -> (B, N, C)."""
    grid = (points.flip(-1) * 2 - 1)[:, :, None, None]  # grid_sample wants (x, y, z) = (k, j, i)
    out = F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[..., 0, 0].transpose(1, 2)


class ResBlockFC(nn.Module):
    """Pre-activation fully connected ResNet block (..., size_in) -> (..., size_out)."""

    def __init__(self, size_in: int, size_out: int | None = None):
        super().__init__()
        size_out = size_in if size_out is None else size_out
        size_h = min(size_in, size_out)
        self.fc_0, self.fc_1 = nn.Linear(size_in, size_h), nn.Linear(size_h, size_out)
        self.shortcut = None if size_in == size_out else nn.Linear(size_in, size_out, bias=False)
        nn.init.zeros_(self.fc_1.weight)  # each block starts as the identity / a linear shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dx = self.fc_1(F.relu(self.fc_0(F.relu(x))))
        return (x if self.shortcut is None else self.shortcut(x)) + dx


class UNet3D(nn.Module):
    """3D U-Net (B, C_in, R, R, R) -> (B, C_out, R, R, R) with ``levels`` resolutions (max-pool down,
    nearest up, concatenation skips), GroupNorm(8) + ReLU convolutions from MONAI blocks.

    Channel plan of the reference (pytorch-3dunet ``UNet3D``): features ``f * 2**l``; an encoder's first
    convolution goes to ``max(out // 2, in)`` channels.
    """

    def __init__(self, in_channels: int, out_channels: int, features: int = 32, levels: int = 3):
        super().__init__()
        conv = dict(spatial_dims=3, act="relu", norm=("group", {"num_groups": 8}), bias=False)
        chans = [features * 2**lvl for lvl in range(levels)]
        self.encoders = nn.ModuleList()
        prev = in_channels
        for lvl, ch in enumerate(chans):
            mid = max(ch // 2, prev)
            layers = [nn.MaxPool3d(2)] if lvl else []
            layers += [Convolution(in_channels=prev, out_channels=mid, **conv),
                       Convolution(in_channels=mid, out_channels=ch, **conv)]
            self.encoders.append(nn.Sequential(*layers))
            prev = ch
        self.decoders = nn.ModuleList(
            UpCat(in_chns=chans[lvl + 1], cat_chns=chans[lvl], out_chns=chans[lvl], upsample="nontrainable",
                  pre_conv=None, interp_mode="nearest", align_corners=None, **conv)
            for lvl in reversed(range(levels - 1))
        )
        self.final = nn.Conv3d(chans[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
        for dec, skip in zip(self.decoders, reversed(skips[:-1])):
            x = dec(x, skip)
        return self.final(x)


class LocalPoolPointNet(nn.Module):
    """Points (B, N, 3) in [0, 1) -> feature grid (B, c_dim, R, R, R).

    Per-point ResNet MLP; before every block after the first, each point's features are concatenated
    with the max over the points in its grid cell (local pooling). Final per-point features are
    averaged per cell into the grid and refined by a 3D U-Net.
    """

    def __init__(self, hidden_dim: int, c_dim: int, n_blocks: int, grid_res: int, unet: nn.Module,
                 local_coord: bool = True):
        super().__init__()
        self.grid_res, self.local_coord = grid_res, local_coord
        self.fc_pos = nn.Linear(3, 2 * hidden_dim)
        self.blocks = nn.ModuleList(ResBlockFC(2 * hidden_dim, hidden_dim) for _ in range(n_blocks))
        self.fc_c = nn.Linear(hidden_dim, c_dim)
        self.unet = unet

    @staticmethod
    def _scatter(values: torch.Tensor, index: torch.Tensor, size: int, reduce: str) -> torch.Tensor:
        """values (B, N, C), cell index (B, N) -> per-cell reduction (B, size, C); empty cells are 0."""
        out = values.new_zeros(values.shape[0], size, values.shape[2])
        return out.scatter_reduce(1, index[..., None].expand_as(values), values, reduce=reduce, include_self=False)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        res = self.grid_res
        index = _cell_index(points, res)
        x = torch.frac(points * res) if self.local_coord else points  # position inside the cell
        net = self.blocks[0](self.fc_pos(x))
        for block in self.blocks[1:]:
            pooled = self._scatter(net, index, res**3, "amax").gather(1, index[..., None].expand_as(net))
            net = block(torch.cat((net, pooled), dim=-1))
        c = self.fc_c(net)
        grid = self._scatter(c, index, res**3, "mean").transpose(1, 2)
        return self.unet(grid.reshape(c.shape[0], c.shape[2], res, res, res))


class LocalDecoder(nn.Module):
    """Points (B, N, 3) + feature grid (B, C, R, R, R) -> per-point outputs (B, N, out_dim)."""

    def __init__(self, c_dim: int, hidden_dim: int, n_blocks: int, out_dim: int, local_res: int | None = None):
        super().__init__()
        self.local_res = local_res
        self.fc_p = nn.Linear(3, hidden_dim)
        self.fc_c = nn.ModuleList(nn.Linear(c_dim, hidden_dim) for _ in range(n_blocks))
        self.blocks = nn.ModuleList(ResBlockFC(hidden_dim) for _ in range(n_blocks))
        self.fc_out = nn.Linear(hidden_dim, out_dim)

    def forward(self, points: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        c = _sample_grid(features, points)
        net = self.fc_p(torch.frac(points * self.local_res) if self.local_res else points)
        for fc_c, block in zip(self.fc_c, self.blocks):
            net = block(net + fc_c(c))
        return self.fc_out(F.relu(net))


class SAPVoxelizer(nn.Module):
    """Shape-as-Points voxelizer.

    ``SAPVoxelizer(preset="paper" | "small" | "tiny", **overrides)``; keys: ``dpsr_res, grid_res,
    hidden_dim, c_dim, n_blocks, unet_levels, unet_features, num_offset, offset_scale, sigma,
    local_coord``.

    ``forward(points (B, N, 3) in [0, 1)^3)`` returns a dict with ``indicator`` (B, r, r, r) (inside < 0),
    ``points`` (B, K*N, 3) the displaced copies (K = num_offset consecutive copies per input point,
    clamped to the grid ``[0, (r-1)/r]``) and ``normals`` (B, K*N, 3) (unnormalised, outward).
    ``oriented_points`` returns the copies and normals only, e.g. to run DPSR at another resolution.
    """

    def __init__(self, preset: str = "paper", **overrides):
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"unknown SAPVoxelizer preset {preset!r}; choose from {sorted(PRESETS)}")
        cfg = {**_COMMON, **PRESETS[preset]}
        unknown = set(overrides) - set(cfg)
        if unknown:
            raise ValueError(f"unknown SAPVoxelizer option(s) {sorted(unknown)}; valid: {sorted(cfg)}")
        cfg.update(overrides)
        self.config = cfg
        c_dim, hidden, n_blocks, res = cfg["c_dim"], cfg["hidden_dim"], cfg["n_blocks"], cfg["grid_res"]
        unet = UNet3D(c_dim, c_dim, cfg["unet_features"], cfg["unet_levels"])
        self.encoder = LocalPoolPointNet(hidden, c_dim, n_blocks, res, unet, cfg["local_coord"])
        local_res = res if cfg["local_coord"] else None
        self.decoder_offset = LocalDecoder(c_dim, hidden, n_blocks, 3 * cfg["num_offset"], local_res)
        self.decoder_normal = LocalDecoder(c_dim, hidden, n_blocks, 3)
        self.dpsr = DPSR(cfg["dpsr_res"], sigma=cfg["sigma"])

    def oriented_points(self, points: torch.Tensor, res: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Points (B, N, 3) in [0, 1)^3 -> displaced copies (B, K*N, 3) and their normals (B, K*N, 3).

        The copies are clamped to ``[0, (res-1)/res]`` (``res`` defaults to the model's DPSR resolution;
        pass the resolution of the DPSR grid they will be splatted on) so none wraps around the
        periodic grid onto the (0, 0, 0) corner that sets the indicator's scale.
        """
        if points.ndim != 3 or points.shape[-1] != 3:
            raise ValueError(f"SAPVoxelizer expects points of shape (B, N, 3), got {tuple(points.shape)}")
        b, n, _ = points.shape
        k, res = self.config["num_offset"], self.dpsr.res if res is None else res
        features = self.encoder(points)
        offsets = self.decoder_offset(points, features).view(b, n, k, 3)
        moved = (points[:, :, None] + self.config["offset_scale"] * offsets).reshape(b, n * k, 3)
        normals = self.decoder_normal(moved, features)
        return moved.clamp(0.0, (res - 1) / res), normals

    def forward(self, points: torch.Tensor) -> dict[str, torch.Tensor]:
        """Points (B, N, 3) in [0, 1)^3 -> dict(indicator (B, r, r, r), points, normals (B, K*N, 3))."""
        moved, normals = self.oriented_points(points)
        return {"indicator": self.dpsr(moved, normals), "points": moved, "normals": normals}


class SAPIndicator(SAPVoxelizer):
    """:class:`SAPVoxelizer` with a single-tensor interface for MONAI's bundle tools.

    ``forward(points (B, 3, N) channel-first in [0, 1)^3) -> indicator (B, 1, r, r, r)``: the
    ``(B, C, *spatial)`` layout that ``verify_net_in_out`` feeds and checks, and a tensor output that
    ``torch.jit.trace`` (``ckpt_export --use_trace``) accepts. Same parameters and state dict as
    :class:`SAPVoxelizer`, so its weight files load unchanged.
    """

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        moved, normals = self.oriented_points(points.transpose(1, 2))
        return self.dpsr(moved, normals).unsqueeze(1)


def gt_indicator(mask, res: int, side: int | None = None) -> torch.Tensor:
    """Binary mask (X, Y, Z) (or (1, X, Y, Z)) -> ground-truth indicator (res, res, res) float32:
    -0.5 inside, +0.5 outside, on the DPSR grid of the cube of side ``side`` (default max(shape)).

    Node ``n`` sits at voxel ``n * side / res`` (:mod:`scripts.networks.dpsr` convention). With
    ``res == side`` this is the padded mask; for a coarser grid the mask is first box-averaged over
    ``side / res`` voxels (area-style), so nodes on thin structures get intermediate values.
    """
    arr = np.asarray(mask.detach().cpu() if torch.is_tensor(mask) else mask)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"mask must be (X, Y, Z) or (1, X, Y, Z), got shape {arr.shape}")
    side = cube_side(arr.shape, side)
    occ = (arr > 0).astype(np.float32)
    box = round(side / res)
    if box > 1:
        occ = ndimage.uniform_filter(occ, size=box, mode="constant")
    node_vox = nearest_node_index(res, res, side).numpy()  # voxel under each node, per axis
    ix, iy, iz = (node_vox[node_vox < n] for n in arr.shape)  # nodes that fall inside the volume
    out = torch.full((res, res, res), 0.5)
    out[: len(ix), : len(iy), : len(iz)] -= torch.from_numpy(occ[np.ix_(ix, iy, iz)])
    return out


def sap_loss(pred_indicator: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Shape-as-Points loss: MSE between ``tanh`` of the predicted and ground-truth indicator grids."""
    if pred_indicator.shape != gt.shape:
        raise ValueError(f"indicator shapes differ: pred {tuple(pred_indicator.shape)} vs gt {tuple(gt.shape)}")
    return F.mse_loss(torch.tanh(pred_indicator), torch.tanh(gt))
