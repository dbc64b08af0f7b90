"""Peak dense throughput of accelerators, for MFU. Vendor datasheet numbers (dense, no
sparsity); an unknown device gives None and the store records no MFU rather than a guess."""

from __future__ import annotations

# (substring of torch.cuda.get_device_name, precision) -> FLOP/s per device
PEAK_FLOPS: dict[tuple[str, str], float] = {
    ("H200", "bf16"): 989e12,
    ("H100", "bf16"): 989e12,  # SXM; the PCIe card is 756e12 and is matched first below
    ("H100 PCIe", "bf16"): 756e12,
    ("A100", "bf16"): 312e12,
    ("L40S", "bf16"): 362e12,
    ("H200", "fp32"): 67e12,
    ("H100", "fp32"): 67e12,
    ("A100", "fp32"): 19.5e12,
}


def peak_flops(device_name: str | None, precision: str) -> float | None:
    """Peak FLOP/s of one device, longest matching name first."""
    if not device_name:
        return None
    hits = [(len(k[0]), v) for k, v in PEAK_FLOPS.items() if k[0] in device_name and k[1] == precision]
    return max(hits)[1] if hits else None
