"""app/deploy/diagnose.py: likely causes of a failed start, from the log."""

from __future__ import annotations

import pytest

from app.deploy.diagnose import classify_log


@pytest.mark.parametrize(
    ("line", "cause"),
    [
        ("vllm: error: unrecognized arguments: --bogus", "vLLM rejected its command line"),
        ("OSError: [Errno 98] Address already in use", "the port is already in use"),
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate", "out of memory"),
        ("ValueError: No available memory for the cache blocks.", "out of memory"),
        ("RuntimeError: The NVIDIA driver on your system is too old", "GPU driver / CUDA mismatch"),
        (
            "huggingface_hub.errors.GatedRepoError: 401 Client Error",
            "the model is gated or private",
        ),
        (
            "LocalEntryNotFoundError: outgoing traffic has been disabled",
            "the model is not in the host's Hugging Face cache",
        ),
        ("Segmentation fault", "unknown"),
    ],
)
def test_classify_log(line: str, cause: str) -> None:
    found, fix = classify_log(["INFO starting", line])
    assert found == cause
    assert fix
