"""Developer tools, outside the product: the real-vLLM venv builder and servers, a tiny local
model, the dashboard screenshot. Tests, benches and ``scripts/`` use them; ``app`` never does.
"""
