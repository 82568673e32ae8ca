"""Write-then-publish: a file that exists is always complete, whatever kills the writer.

Kept for its callers; the implementation (local rename, or one object upload on gs://) lives in
mile.paths, the one path layer.
"""

from mile.paths import replacing, write_bytes, write_text

__all__ = ["replacing", "write_bytes", "write_text"]
