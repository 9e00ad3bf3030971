"""canao: compression-compilation co-design for real-time transformer apps on devices."""

__version__ = "0.1.0"

import os

# Weights come from installed packages; nothing may reach a model hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
