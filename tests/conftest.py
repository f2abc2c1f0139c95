import os

os.environ.setdefault("ILR_INSPECT_TIMESTAMP", "2026-01-01T00:00:00+00:00")
