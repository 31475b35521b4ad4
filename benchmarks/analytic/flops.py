"""The benchmarks' FLOP counts: the library's (models/flops.py, also read by scaling.py) and the devices' peaks, for
achieved TFLOP/s and % of peak."""
from models.flops import (decode_flops, encode_flops, sampling_flops, teacher_forcing_flops, training_flops,
                          transformer_flops)

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device name; --peak_tflops overrides
PEAK_BF16_TFLOPS = {'H200': 790.0, 'H100 80GB HBM3': 989.0, 'H100 PCIe': 756.0, 'A100': 312.0, 'L40S': 362.0,
                    'RTX 4090': 165.0}


def device_peak_tflops(name: str) -> float:
    """The dense bf16 peak of a device name (e.g. 'NVIDIA H200'); 0.0 when unknown (no % of peak is printed)."""
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return 0.0


__all__ = ['decode_flops', 'encode_flops', 'sampling_flops', 'teacher_forcing_flops', 'training_flops',
           'transformer_flops', 'PEAK_BF16_TFLOPS', 'device_peak_tflops']
