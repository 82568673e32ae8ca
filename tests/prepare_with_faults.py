"""python -m mile.prepare with a fault injected for tests, chosen by environment variables:

  MILE_TEST_HOLD_AT_RECORD=n   the process writes MILE_TEST_HOLD_FILE + ".held" just before its
                               n-th record (counted over every store it builds), then waits (at
                               most 120 s) for MILE_TEST_HOLD_FILE: a test kills it mid-unit

Run it as `python tests/prepare_with_faults.py --config ... --workers 1` (units run in this process).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mile import prepare  # noqa: E402
from mile.data import store  # noqa: E402

_write = store.ShardWriter.write
_records = [0]


def _write_with_hold(self, record):
    _records[0] += 1
    if _records[0] == int(os.environ.get("MILE_TEST_HOLD_AT_RECORD", "0")):
        release = os.environ["MILE_TEST_HOLD_FILE"]
        with open(release + ".held", "w"):
            pass
        deadline = time.monotonic() + 120
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.01)
    return _write(self, record)


store.ShardWriter.write = _write_with_hold

if __name__ == "__main__":
    prepare.run()
