"""``sfwatch check --online``: do the configured form fields pass the server?

A field the server refuses holds every upload until a reload (docs/design.md §8),
so ``check --online`` finds out first: one short upload (a second of silence,
made here with the standard library's ``wave``) per distinct effective request,
that is per distinct (model, form fields) among the watches. It prints the
fields the server accepted and the one it rejected, by config key path. The
default config sends no fields, and so no probe: only ``GET /user/info``.

A server stops at the first field it refuses, so a refusal leaves the other
fields of that request unchecked; they are printed as such.
"""

from __future__ import annotations

import io
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path

from sfwatch.config import Config, Secret, UploadRequest
from sfwatch.errors import FieldRejected, SfwatchError
from sfwatch.text import printable
from sfwatch.transcribe import Transcriber

#: the probe's audio: one second of 16 kHz mono silence (32 KB), cheap on any bill
PROBE_SECONDS = 1.0
PROBE_RATE = 16_000
PROBE_NAME = "sfwatch-probe.wav"


@dataclass(frozen=True)
class FieldProbe:
    """One distinct effective request, and the watches that send it."""

    model: str
    request: UploadRequest
    watches: tuple[str, ...]


def probe_requests(config: Config) -> list[FieldProbe]:
    """One probe per distinct (model, fields, answer format) that sends any field."""
    found: dict[tuple[object, ...], FieldProbe] = {}
    for index, watch in enumerate(config.watch):
        request = watch.upload
        if not request.fields:
            continue
        model = watch.model or config.api.model
        same = (model, tuple((f.name, f.value) for f in request.fields), request.answer)
        earlier = found.get(same)
        label = f"watch[{index}]"
        if earlier is None:
            found[same] = FieldProbe(model, request, (label,))
        else:
            found[same] = FieldProbe(model, earlier.request, (*earlier.watches, label))
    return list(found.values())


def silent_wav(seconds: float = PROBE_SECONDS, rate: int = PROBE_RATE) -> bytes:
    """A WAV file of ``seconds`` of silence (16-bit mono)."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"\0\0" * int(seconds * rate))
    return buffer.getvalue()


def _fields(request: UploadRequest, skip: str | None = None) -> str:
    return ", ".join(f"{f.name} ({f.key})" for f in request.fields if f.key != skip) or "none"


def run_probes(client: Transcriber, probes: list[FieldProbe], key: Secret) -> int:
    """Send each probe once; print what passed and what was refused. 1 if anything failed."""
    if not probes:
        return 0
    failed = False
    with tempfile.TemporaryDirectory(prefix="sfwatch-probe-") as scratch:
        audio = Path(scratch) / PROBE_NAME
        audio.write_bytes(silent_wav())
        for probe in probes:
            who = ", ".join(probe.watches)
            try:
                client.transcribe(audio, PROBE_NAME, probe.model, probe.request)
            except FieldRejected as exc:
                failed = True
                said = printable(_scrub(exc.api_message or exc.message, key))
                print(f"rejected ({who}): {exc.key}: the server refused {exc.field!r}: {said}")
                unchecked = printable(_fields(probe.request, exc.key))
                print(f"  not checked (the server stops at the first): {unchecked}")
                continue
            except SfwatchError as exc:
                failed = True
                print(f"probe failed ({who}): {printable(_scrub(str(exc), key))}")
                continue
            print(f"accepted ({who}): {printable(_fields(probe.request))}")
    return 1 if failed else 0


def _scrub(text: str, key: Secret) -> str:
    secret = key.reveal()
    return text.replace(secret, "[REDACTED]") if secret else text
