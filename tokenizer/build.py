# Builds the parts of a tokenizer training run of VAR (arXiv 2404.02905, section 3.2) from its parsed flags.
"""The trainable VQVAE, the LPIPS loss with its weights, the AdamW optimisers, and the step results as floats.

These read the parsed flags of `tokenizer.args` and, for LPIPS, weight files: torchvision's ImageNet VGG16 (the torch
hub cache, `--lpips_vgg PATH`, else a download) and the learned per-channel weights (by default those the `lpips`
package ships; `--lpips_lin PATH` for another file, `--lpips_lin=none` for the uncalibrated baseline).
"""
import os
from typing import Any, Dict, Mapping, Optional

import torch

import dist
import models
from tokenizer.args import VAEDerived
from tokenizer.codebook import phi_indices_used
from tokenizer.lpips import LPIPS, shipped_lin_file
from utils.amp_sc import AmpOptimizer
from utils.lr_control import build_param_groups

VGG16_FILE = 'vgg16-397923af.pth'  # torchvision's ImageNet VGG16 weights, as named in the torch hub cache
LIN_SHIPPED = 'auto'  # --lpips_lin: the learned weights shipped in the `lpips` package
LIN_BASELINE = ('none', '')  # --lpips_lin: weight 1 per channel ('' was the flag's default before 'auto')


def build_vqvae(args, cfg: VAEDerived, device: torch.device) -> models.VQVAE:
    """The trainable VQVAE (from the flags, or from --vae_init whose architecture must match them)."""
    kw = dict(vocab_size=args.vocab, z_channels=args.cvae, ch=args.vae_ch, ch_mult=cfg.ch_mult, beta=args.beta,
              share_quant_resi=args.share_qresi, v_patch_nums=cfg.patch_nums)
    init_sd = None
    if args.vae_init:
        init = models.load_vae_checkpoint(args.vae_init, device='cpu', patch_nums=cfg.patch_nums)
        theirs = {k: init.config[k] for k in ('vocab_size', 'z_channels', 'ch', 'ch_mult', 'share_quant_resi')}
        mine = {'vocab_size': args.vocab, 'z_channels': args.cvae, 'ch': args.vae_ch, 'ch_mult': list(cfg.ch_mult),
                'share_quant_resi': args.share_qresi}
        if theirs != mine:
            flags = (f"--vocab={theirs['vocab_size']} --cvae={theirs['z_channels']} --vae_ch={theirs['ch']} "
                     f"--vae_ch_mult={'_'.join(map(str, theirs['ch_mult']))} "
                     f"--share_qresi={theirs['share_quant_resi']}")
            raise ValueError(f'--vae_init {args.vae_init} has another architecture than the flags; pass {flags}')
        init_sd = init.state_dict()
    with torch.device(device):
        vae = models.VQVAE(test_mode=False, **kw)
    if init_sd is not None:
        vae.load_state_dict(init_sd, strict=True)
    vae.train()
    # Phi convolutions that no scale selects get no gradient; freezing them keeps DDP's "every parameter is used"
    if args.share_qresi >= 2:
        used = set(phi_indices_used(cfg.patch_nums, args.share_qresi))
        for k, phi in enumerate(vae.quantize.quant_resi.qresi_ls):
            phi.requires_grad_(k in used)
    return vae


def resolve_vgg16(spec: str) -> Dict[str, torch.Tensor]:
    """torchvision's ImageNet VGG16 state dict: from a path, or ('auto') the torch hub cache, else a download."""
    if spec and spec != 'auto':
        if not os.path.isfile(spec):
            raise FileNotFoundError(f'--lpips_vgg {spec} does not exist')
        return torch.load(spec, map_location='cpu', weights_only=True)
    cached = os.path.join(torch.hub.get_dir(), 'checkpoints', VGG16_FILE)
    if os.path.isfile(cached):
        return torch.load(cached, map_location='cpu', weights_only=True)
    try:
        from torchvision.models import VGG16_Weights
        return VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=dist.is_local_master())
    except Exception as e:
        raise RuntimeError(
            f'the LPIPS perceptual loss needs torchvision\'s VGG16 ImageNet weights and could not get them '
            f'({type(e).__name__}: {e}). Offline, fetch https://download.pytorch.org/models/{VGG16_FILE} on another '
            f'machine and pass --lpips_vgg=PATH (or copy it to {cached}); or train without it: --lp=0.') from e


def resolve_lpips_lin(spec: str) -> Optional[Mapping[str, torch.Tensor]]:
    """LPIPS's per-channel weights for --lpips_lin: 'auto' the `lpips` package's learned VGG weights, a path that
    file, 'none' (or '') None: weight 1 per channel, the uncalibrated baseline."""
    if spec in LIN_BASELINE:
        return None
    path = shipped_lin_file() if spec == LIN_SHIPPED else spec
    if not os.path.isfile(path):
        raise FileNotFoundError(f'--lpips_lin {spec} does not exist')
    return torch.load(path, map_location='cpu', weights_only=True)


def build_lpips(args, device: torch.device) -> LPIPS:
    """The frozen LPIPS of --lpips_vgg and --lpips_lin."""
    lpips = LPIPS()
    lpips.load_vgg16(resolve_vgg16(args.lpips_vgg))
    lin = resolve_lpips_lin(args.lpips_lin)
    if lin is not None:
        lpips.load_lin(lin)
    return lpips.to(device)


def make_opt(module: torch.nn.Module, lr: float, args, device: torch.device) -> AmpOptimizer:
    """AdamW over the trainable parameters; no weight decay on 1-d tensors, biases and the codebook (decay would
    drag rarely chosen codes towards zero, away from the latents they should match)."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(build_param_groups(named, no_wd_keys=('embedding',)), lr=lr,
                            betas=(args.abeta1, args.abeta2), weight_decay=0.0,
                            fused=args.afuse and device.type in ('cuda', 'cpu'))
    return AmpOptimizer(opt, [p for _, p in named], device.type, fp16=args.fp16, grad_clip=args.tclip,
                        n_gradient_accumulation=args.ac, max_nonfinite=args.max_nonfinite)


def step_scalars(out: Dict[str, Any]) -> Dict[str, float]:
    """The scalar results of a train step as floats, with one host sync for all the tensors."""
    keys = [k for k, v in out.items() if isinstance(v, torch.Tensor) and v.numel() == 1]
    values = torch.stack([out[k].float().reshape(()) for k in keys]).tolist() if keys else []
    scalars = dict(zip(keys, values))
    scalars.update({k: out[k] for k in ('grad_norm', 'd_grad_norm') if out.get(k) is not None})
    return scalars


__all__ = ['build_vqvae', 'resolve_vgg16', 'resolve_lpips_lin', 'build_lpips', 'make_opt', 'step_scalars',
           'VGG16_FILE']
