"""Progress bars: tqdm widgets in JupyterLab, text where nobody watches a widget.

`nvmlib reproduce` runs its kernels with NVMLIB_PROGRESS=text: a widget saved in an executed
notebook keeps only its first frame ("0%"), while a text bar on stdout ends as its last line
(papermill's stream coalescing resolves the carriage returns).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from tqdm import tqdm as text_bar
from tqdm.auto import tqdm as auto_bar

ENV = "NVMLIB_PROGRESS"


def tqdm(*args: Any, **kwargs: Any) -> text_bar:
    """tqdm.auto's bar (a widget in a Jupyter kernel), or a text bar on stdout when
    NVMLIB_PROGRESS=text."""
    if os.environ.get(ENV) != "text":
        return auto_bar(*args, **kwargs)
    kwargs.setdefault("file", sys.stdout)  # stderr would be shown as an error in the notebook
    kwargs["disable"] = bool(
        kwargs.get("disable", False)
    )  # a kernel's stdout is no TTY: None would hide it
    return text_bar(*args, **kwargs)


@contextmanager
def text_bars() -> Iterator[None]:
    """Within: text bars here and in the kernels started here (they inherit the environment)."""
    before = os.environ.get(ENV)
    os.environ[ENV] = "text"
    try:
        yield
    finally:
        if before is None:
            del os.environ[ENV]
        else:
            os.environ[ENV] = before
