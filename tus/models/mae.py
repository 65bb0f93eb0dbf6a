"""Masked autoencoder around a timm Vision Transformer (He et al. 2022, "Masked Autoencoders Are
Scalable Vision Learners"; the USF-MAE recipe for ultrasound).

The encoder is a plain timm ``VisionTransformer`` (``self.encoder``) so that, after pretraining, it can be
exported and fine-tuned as an ordinary backbone: its ``forward_features``/``forward`` still take full images.
During pretraining :meth:`MaskedAutoencoderViT.forward_encoder` runs it on the visible patches only
(Sec. 3 "MAE encoder"); a lightweight decoder of timm ``Block``s fills in mask tokens and predicts the pixels
of every patch (Sec. 3 "MAE decoder"). Encoder and decoder use fixed 2-D sin-cos position embeddings.
"""

from __future__ import annotations

import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from tus.losses.mae import mae_loss, patchify, random_masking
from tus.models.vit import create_vit_encoder


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, (1, [1 +] grid_h * grid_w, dim), patches in row-major order.

    Built by timm's ``build_sincos2d_pos_embed``: per position (h, w) the channels are
    ``[sin(h w_k), sin(w w_k), cos(h w_k), cos(w w_k)]`` with ``w_k = 10000 ** (-k / (dim / 4))``. These are the
    reference MAE frequencies in another channel order, which is immaterial for a fixed embedding. The class
    token gets zeros, as in the reference.
    """
    patches = build_sincos2d_pos_embed([grid_h, grid_w], dim=dim)
    if cls_token:
        patches = torch.cat([torch.zeros(1, dim), patches], dim=0)
    return patches.unsqueeze(0)


class MaskedAutoencoderViT(nn.Module):
    """MAE: timm ViT encoder on visible patches + lightweight transformer decoder (He et al. 2022, Fig. 1)."""

    def __init__(
        self,
        name: str = "vit_base_patch16_224",
        img_size: int | tuple[int, int] = 224,
        patch_size: int | None = None,
        in_chans: int = 1,
        global_pool: str = "token",
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        **encoder_kwargs: object,
    ) -> None:
        super().__init__()
        # The encoder's final norm normalises the tokens handed to the decoder, so it must be a real norm also
        # for average pooling (timm would otherwise move it after the pooling, as ``fc_norm``).
        encoder_kwargs.setdefault("fc_norm", False)
        # Everything needed to rebuild the bare encoder (e.g. for fine-tuning the export) with create_vit_encoder.
        self.encoder_kwargs: dict[str, object] = {
            "name": name, "img_size": img_size, "patch_size": patch_size, "in_chans": in_chans,
            "global_pool": global_pool, **encoder_kwargs,
        }  # fmt: skip
        self.encoder = create_vit_encoder(**self.encoder_kwargs)
        if self.encoder.num_prefix_tokens != 1 or self.encoder.cls_token is None or self.encoder.no_embed_class:
            raise ValueError(f"'{name}': MAE needs a ViT with exactly one class token in its position embedding")
        if isinstance(self.encoder.norm, nn.Identity):
            raise TypeError(f"'{name}': MAE needs the encoder's final norm (do not pass fc_norm=True)")
        self.patch_size = self.encoder.patch_embed.patch_size[0]
        self.grid_hw: tuple[int, int] = tuple(self.encoder.patch_embed.grid_size)
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        num_patches = self.grid_hw[0] * self.grid_hw[1]
        embed_dim = self.encoder.embed_dim

        self.encoder.pos_embed.data.copy_(sincos_pos_embed_2d(embed_dim, *self.grid_hw))
        self.encoder.pos_embed.requires_grad_(False)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(decoder_embed_dim, *self.grid_hw))
        self.decoder_blocks = nn.ModuleList(Block(decoder_embed_dim, decoder_num_heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size**2 * in_chans)
        self.num_patches = num_patches
        self._init_weights()

    def _init_weights(self) -> None:
        """The reference initialisation: xavier-uniform linears and patch projection, N(0, 0.02) tokens."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # The patch projection is a linear layer on flattened patches, initialised as such.
        proj = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(proj.data.view(proj.shape[0], -1))
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_encoder(self, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Encode only the patches ``ids_keep`` (B, kept): returns normalised tokens (B, 1 + kept, D).

        Position embeddings are added before the gather so each visible token keeps its place in the grid;
        the masked patches never enter the transformer blocks.
        """
        encoder = self.encoder
        x = encoder.patch_embed(images) + encoder.pos_embed[:, 1:]
        x = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = encoder.norm_pre(encoder.pos_drop(x))
        x = encoder.blocks(x)
        return encoder.norm(x)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Predict pixels (B, L, p*p*C) of every patch from the encoded visible tokens plus mask tokens."""
        x = self.decoder_embed(latent)
        batch, num_patches = ids_restore.shape
        mask_tokens = self.mask_token.expand(batch, num_patches + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)
        # Undo the shuffle: visible tokens and mask tokens go back to their grid positions.
        patches = torch.gather(patches, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:]

    def forward(self, images: torch.Tensor, mask_ratio: float = 0.75, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Mask, encode, decode; returns ``loss`` (masked patches only), ``pred`` (B, L, p*p*C), ``mask`` (B, L)."""
        ids_keep, mask, ids_restore = random_masking(images.shape[0], self.num_patches, mask_ratio, generator=generator, device=images.device)
        latent = self.forward_encoder(images, ids_keep)
        pred = self.forward_decoder(latent, ids_restore)
        loss = mae_loss(pred, patchify(images, self.patch_size), mask, norm_pix_loss=self.norm_pix_loss)
        return {"loss": loss, "pred": pred, "mask": mask}
