"""lacd: the local-ai-coder daemon.

Watches the agent's interaction log, keeps every lesson exactly once in a SQLite queue, and
turns accumulated lessons into a LoRA-tuned model registered with Ollama.
"""

__version__ = "0.1.0"

from lacd.logs import quiet_torchao  # noqa: E402

quiet_torchao()
