"""Why a vLLM server died: the likely cause and its fix, read from the end of its log."""

from __future__ import annotations

from collections.abc import Iterable

_CAUSES: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (
        ("unrecognized arguments", "error: argument", "invalid choice", "expected one argument"),
        "vLLM rejected its command line",
        "check the extra vLLM flags after '--' (vllm serve --help on the host lists them)",
    ),
    (
        ("address already in use", "errno 98"),
        "the port is already in use",
        "pick another --vllm-port or stop the process listening there",
    ),
    (
        ("gatedrepoerror", "gated repo", "access to model", "401 client error", "403 client error"),
        "the model is gated or private",
        "accept the licence on the model page and export HF_TOKEN, then rerun deploy",
    ),
    (
        (
            "out of memory",
            "outofmemoryerror",
            "no available memory for the cache blocks",
            "insufficient memory",
            "cannot allocate memory",
            "not enough memory",
        ),
        "out of memory",
        "lower --max-model-len, pass '-- --gpu-memory-utilization 0.85', free the GPUs, "
        "or raise --tp",
    ),
    (
        (
            "driver version is insufficient",
            "found no nvidia driver",
            "nvidia driver on your system is too old",
            "cuda driver initialization failed",
            "cudaerrorinsufficientdriver",
            "no cuda gpus are available",
            "failed to infer device type",
        ),
        "GPU driver / CUDA mismatch",
        "update the NVIDIA driver, or install a vLLM built for the host's CUDA (--vllm-version)",
    ),
    (
        (
            "localentrynotfounderror",
            "outgoing traffic has been disabled",
            "cannot find the requested files in the local cache",
        ),
        "the model is not in the host's Hugging Face cache",
        "rerun deploy so the download step runs (check --hf-home matches)",
    ),
    (
        ("max_model_len", "max-model-len", "maximum model length"),
        "--max-model-len does not fit",
        "lower --max-model-len",
    ),
)


def classify_log(lines: Iterable[str]) -> tuple[str, str]:
    """(likely cause, fix) for a server that died, from the end of its log."""
    text = "\n".join(lines).lower()
    for needles, cause, fix in _CAUSES:
        if any(needle in text for needle in needles):
            return cause, fix
    return "unknown", "read the log lines above (kvroute deploy logs --host ... shows more)"
