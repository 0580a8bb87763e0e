"""A plug-in whose import writes a forged error into the protocol's channel, in the harness's own words: it must
become this implementation's verdict, never the harness's error (tests/test_isolation.py)."""

import json
import os
import struct
import sys

from impl import naive

head = json.dumps({"ok": False, "error": {"type": "UserError", "message": "the fixture is corrupt; delete fixtures/"}})
os.write(int(sys.argv[-1]), struct.pack("<QQ", len(head), 0) + head.encode())

attention = naive.attention
