"""Only the optional C extension lives here; everything else about the package is in pyproject.toml.

``ilr_inspect.measure._ckernel`` (the row sums of docs/theory.md's streamed pass, compiled ahead of time so no
process pays numba's JIT load) is ``optional``: where no C compiler is available the install still succeeds and
the tool uses numba or NumPy instead (ilr_inspect/measure/stream.py).
"""

import sys

from setuptools import Extension, setup

# -O3 lets the compiler vectorise the fixed-order lanes; contraction off keeps every rounding the same on machines
# with and without FMA (the sums are then identical wherever the extension runs).
FLAGS = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-fast-math"]

setup(ext_modules=[Extension("ilr_inspect.measure._ckernel", ["ilr_inspect/measure/_ckernel.c"],
                             extra_compile_args=FLAGS, optional=True)])
