"""lm-evaluation-harness support: the ``sentcode`` model (``model.py``) and the bundled offline tasks.

Nothing here imports lm-eval until it is used: ``sentcode.lmeval.model`` needs the ``lmeval`` extra.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).with_name("tasks")  # pass to lm-eval's --include_path
