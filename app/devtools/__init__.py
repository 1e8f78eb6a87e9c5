"""Developer tools: a tiny local model and real vLLM servers for contract tests.

Nothing here is imported by the router; tests and scripts use it to put a real vLLM in the loop.
"""
