"""SimConfig: the knobs of one simulated vLLM server, and their command-line flags.

Each field mirrors a `vllm serve` setting (block size, KV capacity, max_num_seqs, max_model_len,
`--api-key`, `--enable-prompt-tokens-details`) or a timing constant of the simulated GPU.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Settings of one simulator; read once, never mutated."""

    model: str | tuple[str, ...] = "sim-model"
    block_size: int = 16
    capacity_blocks: int = 4096
    max_num_seqs: int = 64
    prefill_s_per_token: float = 0.0002
    base_ttft_s: float = 0.005
    decode_tokens_per_s: float = 200.0
    no_delay: bool = False
    max_model_len: int = 32768
    default_max_tokens: int = 16
    prompt_tokens_details: bool = True
    api_key: str | None = None
    seed: int = 0
    log_size: int = 256
    # vLLM's VLLM_ENABLE_RESPONSES_API_STORE: without it nothing is stored and
    # `previous_response_id` always gets 404.
    responses_store: bool = True

    def __post_init__(self) -> None:
        names = self.served_models
        if not names or any(not name for name in names):
            raise ValueError("model: at least one non-empty served model name is required")
        for name in ("block_size", "capacity_blocks", "max_num_seqs", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        if self.decode_tokens_per_s <= 0:
            raise ValueError(f"decode_tokens_per_s must be > 0, got {self.decode_tokens_per_s}")
        for name in ("prefill_s_per_token", "base_ttft_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.log_size < 0:
            raise ValueError(f"log_size must be >= 0, got {self.log_size}")
        if self.api_key == "":
            raise ValueError("api_key must be non-empty when set")

    @property
    def served_models(self) -> tuple[str, ...]:
        """All served names; the first one labels metrics, like vLLM's `model_name`."""
        return (self.model,) if isinstance(self.model, str) else tuple(self.model)


def build_parser() -> argparse.ArgumentParser:
    """`python -m app.simulator` flags: every SimConfig field plus where to listen."""
    defaults = SimConfig()
    parser = argparse.ArgumentParser(
        prog="python -m app.simulator",
        description="Simulated vLLM OpenAI server for tests and demos (no model inside).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0 picks a free port")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument(
        "--model",
        "--served-model-name",
        dest="model",
        nargs="+",
        default=[defaults.model],
        help="served model name(s); the first labels the metrics",
    )
    parser.add_argument("--block-size", type=int, default=defaults.block_size)
    parser.add_argument("--capacity-blocks", type=int, default=defaults.capacity_blocks)
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    parser.add_argument("--prefill-s-per-token", type=float, default=defaults.prefill_s_per_token)
    parser.add_argument("--base-ttft-s", type=float, default=defaults.base_ttft_s)
    parser.add_argument("--decode-tokens-per-s", type=float, default=defaults.decode_tokens_per_s)
    parser.add_argument(
        "--no-delay", action="store_true", help="all sleeps zero (overhead benchmarks)"
    )
    parser.add_argument("--max-model-len", type=int, default=defaults.max_model_len)
    parser.add_argument("--default-max-tokens", type=int, default=defaults.default_max_tokens)
    parser.add_argument(
        "--prompt-tokens-details",
        action=argparse.BooleanOptionalAction,
        default=defaults.prompt_tokens_details,
        help="report usage.prompt_tokens_details.cached_tokens (vLLM's "
        "--enable-prompt-tokens-details)",
    )
    parser.add_argument("--api-key", default=None, help="require Bearer KEY on /v1/*")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--log-size", type=int, default=defaults.log_size, help="requests kept in /sim/stats"
    )
    parser.add_argument(
        "--responses-store",
        action=argparse.BooleanOptionalAction,
        default=defaults.responses_store,
        help="keep Responses for previous_response_id (vLLM's VLLM_ENABLE_RESPONSES_API_STORE)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> SimConfig:
    models: list[str] = list(args.model)
    return SimConfig(
        model=models[0] if len(models) == 1 else tuple(models),
        block_size=args.block_size,
        capacity_blocks=args.capacity_blocks,
        max_num_seqs=args.max_num_seqs,
        prefill_s_per_token=args.prefill_s_per_token,
        base_ttft_s=args.base_ttft_s,
        decode_tokens_per_s=args.decode_tokens_per_s,
        no_delay=args.no_delay,
        max_model_len=args.max_model_len,
        default_max_tokens=args.default_max_tokens,
        prompt_tokens_details=args.prompt_tokens_details,
        api_key=args.api_key,
        seed=args.seed,
        log_size=args.log_size,
        responses_store=args.responses_store,
    )


def config_to_argv(config: SimConfig) -> list[str]:
    """The flags that make `config_from_args` rebuild `config` (inverse of the parser)."""
    argv = ["--model", *config.served_models]
    argv += ["--block-size", str(config.block_size)]
    argv += ["--capacity-blocks", str(config.capacity_blocks)]
    argv += ["--max-num-seqs", str(config.max_num_seqs)]
    argv += ["--prefill-s-per-token", repr(config.prefill_s_per_token)]
    argv += ["--base-ttft-s", repr(config.base_ttft_s)]
    argv += ["--decode-tokens-per-s", repr(config.decode_tokens_per_s)]
    argv += ["--max-model-len", str(config.max_model_len)]
    argv += ["--default-max-tokens", str(config.default_max_tokens)]
    argv += ["--seed", str(config.seed)]
    argv += ["--log-size", str(config.log_size)]
    if config.no_delay:
        argv.append("--no-delay")
    if not config.prompt_tokens_details:
        argv.append("--no-prompt-tokens-details")
    if config.api_key is not None:
        argv += ["--api-key", config.api_key]
    if not config.responses_store:
        argv.append("--no-responses-store")
    return argv


def parse_argv(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, SimConfig]:
    """Parse flags; a bad value exits with argparse's usage message, naming the field."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    return args, config
