"""tox loads this file as an in-tree plugin: it makes the Pythons that pyenv installed
(3.10 and later) visible to tox's interpreter discovery, for the py311/py312/py313 envs."""

import glob
import os
import re

_ROOT = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
_BINS = [b for b in sorted(glob.glob(os.path.join(_ROOT, "versions", "3.*", "bin")))
         if re.search(r"/3\.1\d+\.\d+/bin$", b)]
if _BINS:
    os.environ["PATH"] = os.pathsep.join([*_BINS, os.environ.get("PATH", "")])
