"""tokenpak: a local proxy for LLM APIs that compresses prompts, caches answers and
accounts every token and cent.

Clients point their base URL at http://localhost:8766 and keep their own API keys;
tokenpak forwards each request to the provider the key belongs to.
"""

__version__ = "0.1.0"
