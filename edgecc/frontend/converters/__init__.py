"""edgecc's converters, registered with TVM's ONNX importer by `edgecc.frontend.lower` while it imports.

One module per family of ops (contrib: ONNX Runtime's com.microsoft ops and edgecc's kernel ops;
standard: ONNX ops TVM's importer lacks, computes wrongly or fails on; ...). Every module of this
package is imported, so a new family is a new file. An op is registered by one module only.
"""

import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
