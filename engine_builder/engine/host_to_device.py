"""Small host lists to the device without stalling it."""

import torch


def index_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 indices on `device`; on a GPU through pinned memory without waiting (a plain copy from pageable
    memory would first wait for everything queued on the device)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.long, device=device)
    return torch.tensor(values, dtype=torch.long, pin_memory=True).to(device, non_blocking=True)
