"""Simulated vLLM OpenAI server for tests, demos and benchmarks.

It is not a model and never pretends to be one: it renders and "tokenises" prompts cheaply, keeps a
prefix cache with vLLM's block rules, schedules requests into `max_num_seqs` slots and emits fixed
text ("tok0 tok1 ...") at a configured speed. Everything a router can see matches vLLM 0.32:
routes, JSON and SSE shapes, error bodies, usage with `cached_tokens`, `/metrics` names, abort on
disconnect. `/version` says `"simulator": true`; `/sim/*` adds test controls (see `server`).
"""

from __future__ import annotations

from app.simulator.cache import Allocation, PrefixCache, hash_blocks
from app.simulator.config import SimConfig
from app.simulator.prompt import render_chat, tokenize, tokenize_bytes
from app.simulator.runner import SimulatorProcess
from app.simulator.server import SimulatorApp, create_app

__all__ = [
    "Allocation",
    "PrefixCache",
    "SimConfig",
    "SimulatorApp",
    "SimulatorProcess",
    "create_app",
    "hash_blocks",
    "render_chat",
    "tokenize",
    "tokenize_bytes",
]
