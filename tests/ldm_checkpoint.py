"""A diffusers-layout SD-1.x or SDXL model written as an original (CompVis LDM / SGM) single-file
checkpoint: the key layout of the .safetensors files users download, for any UNet / VAE config,
so the single-file loader can be tested on a tiny random model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

# LDM's names for a UNet resnet's layers (ResBlock's Sequentials) and a VAE attention's.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _unet_prefixes(cfg: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """diffusers prefix -> (LDM prefix, whether it is a resnet), from the block layout: LDM
    numbers input blocks 1.. (conv_in is 0) with one slot per resnet (+ its attention) and one
    for the downsampler per level; output blocks with layers_per_block + 1 slots per level, the
    upsampler riding in the level's last slot after its attention, if any."""
    per = cfg["layers_per_block"]
    levels = len(cfg["block_out_channels"])
    out: dict[str, tuple[str, bool]] = {
        "mid_block.resnets.0.": ("middle_block.0.", True),
        "mid_block.attentions.0.": ("middle_block.1.", False),
        "mid_block.resnets.1.": ("middle_block.2.", True),
    }
    for i in range(levels):
        for j in range(per):
            k = 1 + i * (per + 1) + j
            out[f"down_blocks.{i}.resnets.{j}."] = (f"input_blocks.{k}.0.", True)
            out[f"down_blocks.{i}.attentions.{j}."] = (f"input_blocks.{k}.1.", False)
        out[f"down_blocks.{i}.downsamplers.0.conv."] = (
            f"input_blocks.{1 + i * (per + 1) + per}.0.op.",
            False,
        )
        attn = "CrossAttn" in cfg["up_block_types"][i]
        for j in range(per + 1):
            k = i * (per + 1) + j
            out[f"up_blocks.{i}.resnets.{j}."] = (f"output_blocks.{k}.0.", True)
            out[f"up_blocks.{i}.attentions.{j}."] = (f"output_blocks.{k}.1.", False)
        last = i * (per + 1) + per
        out[f"up_blocks.{i}.upsamplers.0.conv."] = (
            f"output_blocks.{last}.{2 if attn else 1}.conv.",
            False,
        )
    return out


_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}


def _rename(key: str, prefixes: dict[str, tuple[str, bool]]) -> str:
    for old, new in _UNET_TOP.items():
        if key.startswith(old):
            return new + key[len(old) :]
    for old, (new, resnet) in prefixes.items():
        if key.startswith(old):
            rest = key[len(old) :]
            if resnet:
                layer, param = rest.split(".", 1)
                rest = f"{_UNET_RESNET[layer]}.{param}"
            return new + rest
    raise KeyError(f"no LDM name for UNet key {key}")


def unet_to_ldm(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    prefixes = _unet_prefixes(dict(unet.config))
    return {
        "model.diffusion_model." + _rename(k, prefixes): v for k, v in unet.state_dict().items()
    }


def _vae_key(key: str, levels: int) -> tuple[str, bool]:
    """A VAE key in LDM's names, and whether it is an attention projection (a 1x1 conv there)."""
    part, rest = key.split(".", 1)  # encoder / decoder / quant_conv / post_quant_conv
    if part in ("quant_conv", "post_quant_conv"):
        return key, False
    rest = rest.replace("conv_norm_out.", "norm_out.")
    for pos in ("mid_block.resnets.0.", "mid_block.resnets.1."):
        rest = rest.replace(pos, f"mid.block_{int(pos[-2]) + 1}.")
    if rest.startswith("mid_block.attentions.0."):
        name, param = rest[len("mid_block.attentions.0.") :].rsplit(".", 1)
        ldm = _VAE_ATTENTION[name]
        return f"{part}.mid.attn_1.{ldm}.{param}", ldm != "norm" and param == "weight"
    if rest.startswith(("down_blocks.", "up_blocks.")):
        kind, i, sub, rest2 = rest.split(".", 3)
        level = int(i) if kind == "down_blocks" else levels - 1 - int(i)  # LDM's up runs upward
        name = "down" if kind == "down_blocks" else "up"
        if sub == "resnets":
            rest = f"{name}.{level}.block.{rest2}"
        else:  # downsamplers.0.conv / upsamplers.0.conv
            sample = "downsample" if kind == "down_blocks" else "upsample"
            rest = f"{name}.{level}.{sample}.{rest2.split('.', 1)[1]}"
    return f"{part}.{rest.replace('conv_shortcut.', 'nin_shortcut.')}", False


def vae_to_ldm(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    levels = len(vae.config.block_out_channels)
    out = {}
    for k, v in vae.state_dict().items():
        name, conv = _vae_key(k, levels)
        out["first_stage_model." + name] = v[:, :, None, None] if conv else v
    return out


def text_to_ldm(
    text_encoder: torch.nn.Module, prefix: str = "cond_stage_model.transformer."
) -> dict[str, torch.Tensor]:
    """The HF CLIP text tower's keys under SD-1's prefix, as `text_model.*` (transformers >= 5.6
    flattens CLIPTextModel's keys; the checkpoints keep the wrapper's names)."""
    out = {}
    for k, v in text_encoder.state_dict().items():
        if k.endswith("position_ids"):
            continue
        name = k if k.startswith("text_model.") else f"text_model.{k}"
        out[prefix + name] = v
    return out


_OPEN_CLIP_LAYER = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}


def open_clip_to_ldm(text_encoder: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection in OpenCLIP's own layout (SDXL's second encoder): one fused
    q/k/v projection per layer, the text projection as a [hidden, proj] matrix."""
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {
        "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": sd.pop("final_layer_norm.weight"),
        "ln_final.bias": sd.pop("final_layer_norm.bias"),
        "text_projection": sd.pop("text_projection.weight").T,
    }
    for i in range(text_encoder.config.num_hidden_layers):
        layer = f"encoder.layers.{i}."
        block = f"transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            qkv = [sd.pop(f"{layer}self_attn.{p}_proj.{param}") for p in "qkv"]
            out[f"{block}attn.in_proj_{param}"] = torch.cat(qkv)
        for k in [k for k in sd if k.startswith(layer)]:
            rest = k[len(layer) :]
            for old, new in _OPEN_CLIP_LAYER.items():
                rest = rest.replace(old, new)
            out[block + rest] = sd.pop(k)
    sd.pop("embeddings.position_ids", None)
    assert not sd, f"unmapped text keys {sorted(sd)}"
    return {prefix + k: v for k, v in out.items()}


def write_sd1_checkpoint(parts: dict[str, Any], path: Path) -> Path:
    """Save an SD-1.x model's unet, vae and text_encoder as one LDM-layout .safetensors file."""
    state = {
        **unet_to_ldm(parts["unet"]),
        **vae_to_ldm(parts["vae"]),
        **text_to_ldm(parts["text_encoder"]),
    }
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def write_sdxl_checkpoint(parts: dict[str, Any], path: Path) -> Path:
    """Save an SDXL model's unet, vae and both text encoders as one SGM-layout .safetensors file
    (the layout of sd_xl_base_1.0.safetensors)."""
    state = {
        **unet_to_ldm(parts["unet"]),
        **vae_to_ldm(parts["vae"]),
        **text_to_ldm(parts["text_encoder"], "conditioner.embedders.0.transformer."),
        **open_clip_to_ldm(parts["text_encoder_2"], "conditioner.embedders.1.model."),
    }
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
