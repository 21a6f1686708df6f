"""Small helpers around Hugging Face transformers, which is imported only when one of them runs."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

from mmprep.errors import InputError

__all__ = ["custom_code", "custom_code_error", "quiet_transformers"]

#: Where a Hugging Face folder names classes of its own (Python files next to it), for each kind of loader.
_AUTO_MAP_FILES = {"AutoTokenizer": "tokenizer_config.json", "AutoModel": "config.json"}


def custom_code(directory: str | os.PathLike[str], auto_class: str = "AutoTokenizer") -> str | None:
    """The class of its own a Hugging Face folder asks ``auto_class`` to load (``auto_map`` in
    ``tokenizer_config.json`` for ``AutoTokenizer``, in ``config.json`` otherwise), e.g.
    ``"tokenization_chatglm.ChatGLMTokenizer"``; None when it names none. Loading such a folder means running that
    Python file, which mmprep never does (``trust_remote_code=False``)."""
    path = Path(directory) / _AUTO_MAP_FILES.get(auto_class, "config.json")
    try:
        if path.stat().st_size > 16 << 20:
            return None
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    auto = data.get("auto_map") if isinstance(data, dict) else None
    if isinstance(auto, list):  # the old tokenizer form: [slow class, fast class]
        value: object = auto
    elif isinstance(auto, dict):
        value = auto.get(auto_class)
        if value is None and auto_class != "AutoTokenizer":
            value = auto.get("AutoConfig")
    else:
        return None
    if isinstance(value, list | tuple):
        value = next((v for v in value if isinstance(v, str) and v), None)
    return value if isinstance(value, str) and value else None


def custom_code_error(directory: str | os.PathLike[str], what: str) -> InputError | None:
    """The error for a folder whose ``what`` (``tokenizer`` or ``model``) is a class of its own (see
    :func:`custom_code`), or None when it names none."""
    auto_class, config = ("AutoTokenizer", "tokenizer_config.json") if what == "tokenizer" else ("AutoModel",
                                                                                                "config.json")
    code = custom_code(directory, auto_class)
    if code is None:
        return None
    return InputError(f"{directory}: cannot load the {what}: it needs its own Python code ({code}, named by auto_map "
                      f"in {config}), which mmprep does not run", hint=_custom_code_hint(what))


def _custom_code_hint(what: str) -> str:
    """What to do about a folder whose ``what`` (``tokenizer`` or ``model``) needs its own code."""
    if what == "tokenizer":
        return ("mmprep never runs code from a tokenizer folder; where you trust that code, save its fast tokenizer "
                "as a plain one: AutoTokenizer.from_pretrained(DIR, trust_remote_code=True).backend_tokenizer"
                ".save('NEW/tokenizer.json'), plus a tokenizer_config.json without auto_map, and pass NEW")
    return ("mmprep never runs code from a model folder: use a model of an architecture transformers knows "
            "(no auto_map in config.json)")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers while loading (library code never prints): its logging below errors, its progress bars
    and Python warnings; the previous settings come back afterwards."""
    # transformers prints an advisory at import when torch is absent (tokenizers need no torch).
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
