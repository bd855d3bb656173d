"""The order of fsyncs a power loss depends on, read off a real daemon with strace."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.audiogen import wav_bytes
from tests.conftest import daemon_env, write_config
from tests.fakeapi import FakeAPI

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")


def test_a_claim_is_durable_before_its_text_is(tmp_path: Path, fake_api: FakeAPI) -> None:
    """The claim's folders are fsynced after the upload went out and before the text's commit."""
    config = write_config(tmp_path, fake_api.url)
    (tmp_path / "inbox" / "a.wav").write_bytes(wav_bytes(2000))
    trace = tmp_path / "strace.txt"
    calls = "trace=fsync,fdatasync,renameat,renameat2,sendto"
    command = [sys.executable, "-m", "sfwatch", "run", "-c", str(config), "--burst"]
    subprocess.run(
        ["strace", "-f", "-y", "-e", calls, "-o", str(trace), *command],
        env=daemon_env(),
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert (tmp_path / "inbox" / "done" / "a.wav").exists()
    lines = trace.read_text().splitlines()
    claim = next(i for i, line in enumerate(lines) if "rename" in line and '"a.wav"' in line)
    job_folder = re.compile(r"fsync\(\d+</[^>]*/\.sfwatch/work/[^/>]+/[0-9a-f]{12}>\)")
    inbox = re.compile(r"fsync\(\d+<" + re.escape(str(tmp_path / "inbox")) + r">\)")
    wal = re.compile(r"f(data)?sync\(\d+<[^>]*ledger[^>]*-wal>\)")
    first_commit = next(i for i in range(claim, len(lines)) if wal.search(lines[i]))
    synced = lines[claim:first_commit]
    assert any(job_folder.search(line) for line in synced), "the job folder before the text"
    assert any(inbox.search(line) for line in synced), "the inbox folder before the text"
    upload = next(i for i in range(claim, len(lines)) if "sendto(" in lines[i])
    on_the_way = "\n".join(lines[claim:upload])
    assert not job_folder.search(on_the_way), "nothing of the claim fsynced before the upload"
