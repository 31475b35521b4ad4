# Implements the ImageNet sample metrics of VAR (arXiv 2404.02905), section 5, as OpenAI's guided-diffusion evaluator
# defines them: FID, Inception Score, and the precision/recall of Kynkaanniemi et al. (arXiv 1904.06991).
"""FID, Inception Score, precision and recall of generated samples against an OpenAI-format reference batch.

    python evaluate.py --samples samples/d16.npz --ref VIRTUAL_imagenet256_labeled.npz [--out metrics.json]

Samples are an `.npz` (`arr_0`, uint8 N x H x W x 3) or a folder of PNGs; the reference is an `.npz` in the same format
(e.g. `VIRTUAL_imagenet256_labeled.npz`, 10,000 images). Both go through one feature network:

* the TF-compatible Inception-v3 of torch-fidelity ('inception-v3-compat': TF1-style bilinear resize to 299, the 2015
  TF graph's weights), whose 2048-d pool features feed FID and precision/recall and whose bias-free 1008-way logits
  feed the Inception Score, as in OpenAI's evaluator;
* the metric math is in sampling/metrics.py, in float64, with the evaluator's conventions: FID of (mean, covariance
  with N-1) over the pool features; IS over consecutive splits of 5,000 samples in file order; precision/recall with
  k=3 neighbourhoods.

FID compares the samples with the reference file's stored `mu`/`sigma` when it has them, as OpenAI's evaluator does
(the published VAR numbers were computed that way); `--recompute_ref_stats` recomputes them from its images with this
network instead, and a reference without stored statistics is always recomputed. Precision and recall always use the
reference images. The IS splits follow the file order: sample.py packs its `.npz` (and reads PNG folders) in a fixed
shuffled order so that each split mixes the classes, as the official unsorted glob does. The Inception weights come
from `--inception_weights PATH` or torch-fidelity's download into the torch hub cache on first use.
"""
import argparse
import json
import sys
from typing import Any, Dict, List, Optional

from sampling import metrics
from sampling.cli import run_script
from sampling.image_sets import ImageSetError
from utils.runtime import ConfigError, resolve_device, set_tf32, user_errors


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--samples', required=True, help='samples: .npz (arr_0 uint8 NxHxWx3) or a folder of PNGs')
    p.add_argument('--ref', required=True, help='reference batch .npz (arr_0 uint8 NxHxWx3, optionally mu/sigma), e.g. '
                                                'VIRTUAL_imagenet256_labeled.npz')
    p.add_argument('--inception_weights', default=None,
                   help=f'local copy of {metrics.INCEPTION_URL} (default: torch-fidelity downloads it on first use)')
    p.add_argument('--batch_size', type=int, default=100, help='images per forward pass (default: %(default)s)')
    p.add_argument('--device', default=None,
                   help="where the Inception network runs, e.g. cpu, cuda:1 (default: this process's CUDA device when "
                        'there is one, else the CPU)')
    p.add_argument('--recompute_ref_stats', action='store_true',
                   help="recompute the reference's FID statistics from its images instead of using its stored mu/sigma")
    p.add_argument('--out', default=None, help='also write the metrics to this JSON file')
    return p


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Evaluate, print and (with --out) save the metrics; returns them. Raises ConfigError for unusable inputs."""
    if args.batch_size < 1:
        raise ConfigError(f'--batch_size must be positive, got {args.batch_size}')
    try:
        device = resolve_device(args.device)
    except RuntimeError as e:
        raise ConfigError(f'--device {args.device!r}: {e}') from e
    if device.type == 'cuda':  # TF32 would move the features away from the float32 TF graph
        set_tf32(False)
    with user_errors(ImageSetError, RuntimeError, FileNotFoundError):  # the inputs first: the network may download
        metrics.check_image_sets(args.samples, args.ref)
        net = metrics.InceptionFeatures(args.inception_weights).to(device)
    with user_errors(ValueError):  # an unusable image set, or stored statistics of another width
        result = metrics.evaluate(args.samples, args.ref, net, args.batch_size, device, progress=True,
                                  recompute_ref_stats=args.recompute_ref_stats)
    stored = result['fid_reference_statistics'] == 'stored'
    print(f'FID reference statistics: {"the mu/sigma stored in" if stored else "recomputed from the images of"} '
          f'{args.ref}')
    if result['num_samples'] != 50000:
        print(f'note: {result["num_samples"]} samples; the published numbers use 50,000 (50 per class)')
    for name in ('fid', 'inception_score', 'precision', 'recall'):
        print(f'{name:>16}: {result[name]:.4f}')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(result, f, indent=2)
    return result


def _run(args: argparse.Namespace) -> int:
    run(args)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_script(get_parser(), _run, argv)


if __name__ == '__main__':
    sys.exit(main())
