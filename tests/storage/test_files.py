"""storage.files + tasks.step: a failed write (full disk, no permission) names the file or artifact; nothing is published."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pytest

from storage.artifacts import ArtifactStore
from storage.errors import WriteError
from storage.files import Staging
from storage.http import disk_margin
from tasks.step import Step

TABLE = pa.table({"x": pa.array(range(10_000), pa.int64())})
needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (every write: ENOSPC)")


@needs_dev_full
def test_a_full_disk_while_writing_a_staged_file_names_the_file(tmp_path):
    (tmp_path / "table.parquet").symlink_to("/dev/full")
    with pytest.raises(WriteError) as err:
        Staging(tmp_path).write_parquet("table.parquet", TABLE, TABLE.schema)
    assert str(err.value).startswith(f"could not write {tmp_path / 'table.parquet'}: ")
    assert "No space left on device (errno 28)" in str(err.value) and "the disk is full" in str(err.value)


@needs_dev_full
def test_a_full_disk_inside_a_step_names_the_artifact_and_publishes_nothing(home):
    step = Step("writes", version=1)
    kept = step.run(home, {"n": 1}, [], lambda store, out: {"rows": out.write_parquet("t.parquet", TABLE, TABLE.schema)})

    def build(store, out: Staging) -> dict:  # like Keras or matplotlib: the library writes to out.path(name)
        out.path("model.bin").symlink_to("/dev/full")
        with open(out.path("model.bin"), "wb") as f:
            f.write(b"x" * (1 << 20))
        return {}

    with pytest.raises(WriteError) as err:
        step.run(home, {"n": 2}, [], build)
    store = ArtifactStore(home)
    assert f"could not write the artifact {store.uri('writes', step.key({'n': 2}))}: No space left on device" \
        in str(err.value)
    assert [m["key"] for m in store.list()] == [kept.key]  # the failed one is not there; the cached one is intact
    assert store.find("writes", kept.key, verify=True) is not None


def test_a_permission_error_names_the_file(tmp_path):
    if os.geteuid() == 0:  # root ignores file modes; sysfs refuses to create a file even for root (EACCES)
        if not os.path.isdir("/sys/kernel"):
            pytest.skip("needs a directory root may not write to")
        readonly = Path("/sys/kernel")
    else:
        readonly = tmp_path / "staging"
        readonly.mkdir(mode=0o555)
    with pytest.raises(WriteError) as err:
        Staging(readonly).write_json("manifest.json", {"a": 1})
    assert str(err.value) == (f"could not write {readonly / 'manifest.json'}: Permission denied (errno 13); "
                              "check the permissions of that directory (or use --data-home)")


def test_the_free_space_margin_shrinks_with_a_small_disk():
    assert disk_margin(10 * 1024**4) == 64 * 1024**2  # a big disk: 64 MiB
    assert disk_margin(100 * 1024**2) == 2 * 1024**2  # a 100 MiB volume: 2 MiB, not more than the disk holds
    assert disk_margin(0) == 0
