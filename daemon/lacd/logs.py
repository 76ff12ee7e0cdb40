"""structlog setup: JSON lines off a TTY (journald), a readable console on a TTY.

Events carry ids, counts, offsets and reasons; never lesson content above DEBUG.
"""

from __future__ import annotations

import logging
import re
import sys

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def setup(level: str = "info", fmt: str = "auto", stream=None) -> None:
    stream = stream or sys.stderr
    _quiet_libraries()
    console = fmt == "console" or (fmt == "auto" and stream.isatty())
    renderer = structlog.dev.ConsoleRenderer(colors=False) if console else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


TORCHAO_CUDA_KERNEL = re.compile(r"Failed to load \S*/torchao/_C_(mxfp8|cutlass_\w+)[\w.-]*\.so\b")
PYTREE_ENUM = "%s is an Enum subclass and is now natively supported by torch.compile"


def quiet_torchao() -> None:
    """Drop exactly torchao's import noise, in every lacd process (lacd/__init__.py calls this).

    transformers imports torchao whenever it is installed (its quantizers, pulled in by any model
    class and by peft), and torchao then warns on stderr that its CUDA kernels (_C_mxfp8,
    _C_cutlass_90a) failed to load, which they never can into a torch built without CUDA (they link
    libc10_cuda), and torch warns that torchao registers its Enums as pytree constants (deprecated).
    Those lines filled the train child's log, whose tail is the error `lacd status` shows. Any
    other record of these loggers, and the kernels' failure on a CUDA build of torch, is kept."""
    logging.getLogger("torchao").addFilter(_not_torchao_noise)
    logging.getLogger("torch.utils._pytree").addFilter(_not_torchao_noise)


def _not_torchao_noise(record: logging.LogRecord) -> bool:
    if record.name == "torchao":
        torch = sys.modules.get("torch")
        cpu_torch = torch is not None and torch.version.cuda is None
        return not (cpu_torch and TORCHAO_CUDA_KERNEL.match(record.getMessage()))
    enum = record.args[0] if isinstance(record.args, tuple) and record.args else None
    return not (str(record.msg).startswith(PYTREE_ENUM) and getattr(enum, "__module__", "").startswith("torchao."))


def _quiet_libraries() -> None:
    """datasets and transformers draw progress bars and chatter on stderr: journald needs neither."""
    import os

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
