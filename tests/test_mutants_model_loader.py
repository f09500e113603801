"""Gaps in the model_loader tests that mutation testing (bench/mutation.py) found, checked against the
documented contract rather than the implementation."""
from __future__ import annotations

import pytest
import torch

from comfyui_krea.model_loader import operations


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA runtime that answers like a GPU of the given compute capability, on this CPU-only machine."""
    asked = []

    def install(capability=(8, 9), available=True, scaled_mm=True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)

        def get_device_capability(device=None):
            asked.append(device)
            return capability

        monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)
        if not scaled_mm:
            monkeypatch.delattr(torch, "_scaled_mm", raising=False)
        return asked

    return install


# fp8 matrix units: compute capability 8.9 (Ada) and newer, e.g. 9.0 (Hopper); not 8.6 (Ampere) or 8.0 (A100).
@pytest.mark.parametrize("capability,expected", [((8, 9), True), ((9, 0), True), ((12, 0), True), ((8, 6), False),
                                                 ((8, 0), False), ((7, 5), False)])
def test_fp8_matmul_needs_compute_capability_8_9(fake_cuda, capability, expected):
    asked = fake_cuda(capability)
    device = torch.device("cuda", 1)
    assert operations.fp8_matmul_supported(device) is expected
    assert asked == [device]  # the capability of the device asked about, not of the current one


def test_fp8_matmul_is_off_off_cuda_without_a_runtime_or_without_scaled_mm(fake_cuda):
    fake_cuda((9, 0))
    assert operations.fp8_matmul_supported(torch.device("cpu")) is False
    assert operations.fp8_matmul_supported(torch.device("meta")) is False
    fake_cuda((9, 0), available=False)
    assert operations.fp8_matmul_supported(torch.device("cuda")) is False
    fake_cuda((9, 0), available=True, scaled_mm=False)
    assert operations.fp8_matmul_supported(torch.device("cuda")) is False
