"""FLUX's 16-channel KL autoencoder (the VAE), with BFL `ae.safetensors` module names.

Module attribute names are the checkpoint keys of BFL's file (`encoder.down.0.block.1.conv1.weight`,
`decoder.up.3.upsample.conv.weight`, `decoder.mid.attn_1.q.weight`...), so that file loads strictly with no
renaming; `loading.py` reads it (and the diffusers `vae/` layout, see `layouts.py`) into this module.

`AutoEncoder.encode` / `decode` work on raw latents: no scale or shift (LATENT holds raw VAE latents; the
sampler applies FLUX's `(z - SHIFT_FACTOR) * SCALE_FACTOR`). Images are in [-1, 1]. Large inputs are split
into overlapping tiles when the estimated activation memory would not fit (`tiling.py`). An `interrupt` check
given to encode/decode runs before every block of every tile (it raises to stop), so a cancel stops a large image
within one block, not one pass.
"""
from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import tiling
from .config import AutoEncoderConfig

TileCallback = Callable[[int, int], None]  # (tiles or batch chunks done, total)
InterruptCheck = Callable[[], None]  # raises to stop the pass


def _norm(operations: types.SimpleNamespace | types.ModuleType, groups: int, channels: int) -> nn.Module:
    return operations.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int, operations=nn) -> None:
        super().__init__()
        self.norm1 = _norm(operations, groups, in_channels)
        self.conv1 = operations.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = _norm(operations, groups, out_channels)
        self.conv2 = operations.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = operations.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)
        else:
            self.nin_shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In-place activations and sum: at 2048x2048 each full-resolution tensor is gigabytes.
        h = F.silu(self.norm1(x), inplace=True)
        h = self.conv1(h)
        h = F.silu(self.norm2(h), inplace=True)
        h = self.conv2(h)
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return h.add_(shortcut)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q/k/v/proj_out are 1x1 convolutions as in BFL's file."""

    def __init__(self, channels: int, groups: int, operations=nn) -> None:
        super().__init__()
        self.norm = _norm(operations, groups, channels)
        self.q = operations.Conv2d(channels, channels, kernel_size=1)
        self.k = operations.Conv2d(channels, channels, kernel_size=1)
        self.v = operations.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = operations.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 1, H*W, C)
            # Contiguous: with a strided last dim torch falls back to the math kernel, which holds the
            # whole (HW x HW) score matrix (16 GiB for a 2048x2048 image).
            return t.reshape(b, 1, c, h * w).transpose(-1, -2).contiguous()

        q, k, v = tokens(self.q(normed)), tokens(self.k(normed)), tokens(self.v(normed))
        del normed
        out = F.scaled_dot_product_attention(q, k, v)  # fused kernels: no (HW x HW) matrix in memory
        del q, k, v
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return self.proj_out(out).add_(x)


class Downsample(nn.Module):
    def __init__(self, channels: int, operations=nn) -> None:
        super().__init__()
        self.conv = operations.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric padding (right and bottom only), as the checkpoint was trained with.
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    def __init__(self, channels: int, operations=nn) -> None:
        super().__init__()
        self.conv = operations.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool, operations=nn) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups, operations)
        self.attn_1 = AttnBlock(channels, groups, operations) if attention else None
        self.block_2 = ResnetBlock(channels, channels, groups, operations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block_1(x)
        if self.attn_1 is not None:
            x = self.attn_1(x)
        return self.block_2(x)


class EncoderLevel(nn.Module):
    def __init__(self, blocks: list[ResnetBlock], downsample: Downsample | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.downsample = downsample


class DecoderLevel(nn.Module):
    def __init__(self, blocks: list[ResnetBlock], upsample: Upsample | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.upsample = upsample


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, 2*z_channels, H/f, W/f): posterior mean, then log-variance."""

    def __init__(self, config: AutoEncoderConfig, operations=nn) -> None:
        super().__init__()
        widths = config.level_channels
        groups = config.norm_groups
        self.conv_in = operations.Conv2d(config.in_channels, config.ch, kernel_size=3, stride=1, padding=1)
        levels = []
        block_in = config.ch
        for i, width in enumerate(widths):
            blocks = []
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(block_in, width, groups, operations))
                block_in = width
            last = i == len(widths) - 1
            levels.append(EncoderLevel(blocks, None if last else Downsample(block_in, operations)))
        self.down = nn.ModuleList(levels)
        self.mid = MidBlock(block_in, groups, config.mid_attention, operations)
        self.norm_out = _norm(operations, groups, block_in)
        self.conv_out = operations.Conv2d(block_in, 2 * config.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if level.downsample is not None:
                h = level.downsample(h)
        h = self.mid(h)
        h = F.silu(self.norm_out(h), inplace=True)
        return self.conv_out(h)


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_channels, h*f, w*f)."""

    def __init__(self, config: AutoEncoderConfig, operations=nn) -> None:
        super().__init__()
        widths = config.level_channels
        groups = config.norm_groups
        block_in = widths[-1]
        self.conv_in = operations.Conv2d(config.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = MidBlock(block_in, groups, config.mid_attention, operations)
        levels: list[DecoderLevel] = []
        for i in reversed(range(len(widths))):  # built deepest first, stored by level index (BFL's order)
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, widths[i], groups, operations))
                block_in = widths[i]
            levels.insert(0, DecoderLevel(blocks, Upsample(block_in, operations) if i != 0 else None))
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(operations, groups, block_in)
        self.conv_out = operations.Conv2d(block_in, config.out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid(h)
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if level.upsample is not None:
                h = level.upsample(h)
        h = F.silu(self.norm_out(h), inplace=True)
        return self.conv_out(h)


@contextlib.contextmanager
def checked_blocks(module: nn.Module, check: InterruptCheck | None) -> Iterator[None]:
    """While inside, `check()` runs before each resnet, attention, down- and upsampling block of `module` (forward
    pre-hooks, removed afterwards: the math is untouched)."""
    if check is None:
        yield
        return
    blocks = [m for m in module.modules() if isinstance(m, (ResnetBlock, AttnBlock, Downsample, Upsample))]
    handles = [block.register_forward_pre_hook(lambda _module, _args: check()) for block in blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class AutoEncoder(nn.Module):
    """Encoder and decoder; `encode`/`decode` pick batch chunks and tiles to fit the memory at hand."""

    def __init__(self, config: AutoEncoderConfig, operations=nn) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config, operations)
        self.decoder = Decoder(config, operations)

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def pass_bytes(self, kind: str, batch: int, h: int, w: int, device: torch.device) -> int:
        """Estimated peak activation bytes of an untiled `kind` ("encode"/"decode") pass over `batch` inputs of
        h x w latent pixels on `device`: what to ask a memory manager for before running it."""
        return batch * tiling.estimate_bytes(self.config, kind, h, w, self.dtype, device)

    def _encode_pass(self, images: torch.Tensor, out_device: torch.device) -> torch.Tensor:
        moments = self.encoder(images.to(self.device, self.dtype))
        return moments[:, : self.config.z_channels].to(out_device, torch.float32)  # the posterior mean

    def _decode_pass(self, latents: torch.Tensor, out_device: torch.device) -> torch.Tensor:
        return self.decoder(latents.to(self.device, self.dtype)).to(out_device, torch.float32)

    def encode(self, images: torch.Tensor, tile_size: int | None = None, tile_overlap: int | None = None,
               callback: TileCallback | None = None, interrupt: InterruptCheck | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> raw latents (B, z, H/f, W/f) float32, on the input's device.

        H and W must be multiples of the downscale factor f (8). `tile_size` / `tile_overlap` (image pixels)
        force tiling; by default tiles are used only when the whole image would not fit in memory.
        """
        f = self.config.downscale_factor
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"encode expects images of shape (B, {self.config.in_channels}, H, W), "
                             f"got {tuple(images.shape)}.")
        b, _, h, w = images.shape
        if h % f or w % f or h == 0 or w == 0:
            raise ValueError(f"encode needs a height and width that are multiples of {f}, got {h}x{w}.")
        # not inference_mode: callers may update the result in place
        with torch.no_grad(), checked_blocks(self.encoder, interrupt):
            plan = tiling.plan(self.config, "encode", b, h // f, w // f, self.dtype, self.device,
                               tile_size, tile_overlap)
            return tiling.run(plan, images, lambda x: self._encode_pass(x, images.device),
                              in_scale=f, out_scale=1, out_channels=self.config.z_channels, callback=callback)

    def decode(self, latents: torch.Tensor, tile_size: int | None = None, tile_overlap: int | None = None,
               callback: TileCallback | None = None, interrupt: InterruptCheck | None = None) -> torch.Tensor:
        """Raw latents (B, z, h, w) -> images (B, 3, h*f, w*f) float32, about [-1, 1], on the input's device.

        `tile_size` / `tile_overlap` are in image pixels (multiples of f); see `encode`.
        """
        if latents.ndim != 4 or latents.shape[1] != self.config.z_channels:
            raise ValueError(f"decode expects latents of shape (B, {self.config.z_channels}, h, w), "
                             f"got {tuple(latents.shape)}.")
        b, _, h, w = latents.shape
        f = self.config.downscale_factor
        # not inference_mode: callers may update the result in place
        with torch.no_grad(), checked_blocks(self.decoder, interrupt):
            plan = tiling.plan(self.config, "decode", b, h, w, self.dtype, self.device, tile_size, tile_overlap)
            return tiling.run(plan, latents, lambda z: self._decode_pass(z, latents.device),
                              in_scale=1, out_scale=f, out_channels=self.config.out_channels,
                              callback=callback)
