"""A tokenizer folder whose tokenizer is a class of its own says so, and transformers never prompts (issue 19,
item 22)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from _text_helpers import MINILM_DIR, REPO

SAMPLE = REPO / "sample_data"


# -- item 22: a tokenizer that needs its own code ----------------------------------------------------------------


def test_a_custom_code_tokenizer_gives_the_real_reason_and_never_prompts(tmp_path: Path) -> None:
    tok = tmp_path / "glm"
    shutil.copytree(MINILM_DIR, tok)  # real tokenizer files ...
    (tok / "tokenizer_config.json").write_text(json.dumps({  # ... but the class is the folder's own
        "tokenizer_class": "GLMTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_glm.GLMTokenizer", None]}}))
    (tok / "tokenization_glm.py").write_text("raise SystemExit('this code must never run')\n")
    env = dict(os.environ, MMPREP_NO_PROGRESS="1")
    res = subprocess.run([sys.executable, "-m", "mmprep", "tokenize", str(SAMPLE / "manifest.jsonl"), "--tokenizer",
                          str(tok), "--max-length", "8", "--out", str(tmp_path / "t.parquet")],
                         capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
    assert res.returncode == 2, res.stderr
    assert res.stdout == ""  # transformers' "Do you wish to run the custom code? [y/N]" prompt went to stdout
    (line, hint) = res.stderr.strip().splitlines()
    assert line == (f"error: {tok}: cannot load the tokenizer: it needs its own Python code "
                    "(tokenization_glm.GLMTokenizer, named by auto_map in tokenizer_config.json), which mmprep does "
                    "not run")
    assert hint.startswith("hint: mmprep never runs code from a tokenizer folder")
