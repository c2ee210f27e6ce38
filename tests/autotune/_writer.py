"""Subprocess writer for test_processes: loads posattn/autotune/cache.py on its own
(stdlib + filelock only, no torch import), then merges n entries one at a time."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("_cache", ROOT / "posattn" / "autotune" / "cache.py")
C = importlib.util.module_from_spec(spec)
sys.modules["_cache"] = C  # dataclasses look their module up
spec.loader.exec_module(C)

path, tag, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
hdr = {"fingerprint": "test", "device": {}, "versions": {}}
for i in range(n):
    key = {"device_type": "cpu", "dtype": f"{tag}{i}", "n_bucket": 64}
    C.write_entries(path, hdr, [{"op": "tunetest", "backend": "cpu", "version": 1, "key": key,
                                 "bucket_fields": ["n_bucket"], "default": {},
                                 "results": [{"config": {"work": i}, "status": "ok", "time_s": 1e-3, "error": ""}]}])
