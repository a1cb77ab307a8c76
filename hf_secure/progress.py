"""Progress bars for long waits, shown as transformers shows its own.

transformers' ``tqdm`` wrapper: off when transformers' progress bars are disabled
(``HF_HUB_DISABLE_PROGRESS_BARS=1`` or ``transformers.utils.logging.disable_progress_bar()``);
``disable=None`` also keeps it quiet when stderr is not a terminal (logs, CI, pipes).
"""

from __future__ import annotations

from transformers.utils import logging as hf_logging


def progress(total: int, desc: str, unit: str = "step"):
    """A tqdm bar of ``total`` steps, used as a context manager; ``update()`` per step."""
    return hf_logging.tqdm(total=total, desc=desc, unit=unit, disable=None, leave=False)
