"""Card benchmark (issue 4): CMS-style signatures through PC/SC beside the same signature with a file key.

    .venv/bin/python bench/card_bench.py [--signatures 200] [--latency 0]

Starts pcscd (own reader.conf, its own network namespace) and the virtual CPS card unless a
pcscd with the gateway's reader already runs, then signs 164-byte inputs (the size of CMS signed
attributes) with the card's key 0x81 through `CardSigner`, and with the same key loaded from its
PEM file through `FileKey` (smime/filekeys.py), in the same run. Prints medians per signature,
signatures per second, APDU round trips per signature and per APDU, and the worst event-loop lag
seen by a 5 ms heartbeat while the card signed. Target: the PC/SC path adds < 5 ms per
signature over the file key at 0 latency.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from pcsc_support import PcscStack, PracticeCardFiles

from cps.apdu import ApduChannel, Command
from cps.pcsc import PcscContext
from cps.worker import CardSession
from gateway.devpki import create_dev_pki
from smime.filekeys import FileKey

RPPS = "10001234567"
PIN = "1234"
_GET_TRIES = Command(0x00, 0xCB, 0x3F, 0xFF, bytes.fromhex("4D087006BF810102A080"), le=256)


async def _timed(sign: Callable[[bytes], Awaitable[bytes]], data: bytes, count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        await sign(data)
        times.append(time.perf_counter() - start)
    return times


async def _measure(stack: PcscStack, pki: Path, count: int) -> None:
    session = CardSession(stack.reader, timeout=60)
    practitioner = pki / "practitioners" / RPPS
    file_key = FileKey.from_pem((practitioner / "sign.key").read_bytes(), (practitioner / "sign.crt").read_bytes())
    data = bytes(range(164))
    try:
        await session.status()
        await session.unlock(PIN)
        signer = session.signer()
        await signer.sign(data)
        await file_key.sign(data)

        worst = 0.0
        stop = asyncio.Event()

        async def heartbeat() -> None:
            nonlocal worst
            while not stop.is_set():
                before = time.perf_counter()
                await asyncio.sleep(0.005)
                worst = max(worst, time.perf_counter() - before - 0.005)

        beat = asyncio.create_task(heartbeat())
        trips_before = session.round_trips
        card_times = await _timed(signer.sign, data, count)
        trips = (session.round_trips - trips_before) / count
        stop.set()
        await beat
        file_times = await _timed(file_key.sign, data, count)

        apdu = await asyncio.to_thread(_apdu_round_trip, stack.reader, 200)
    finally:
        await session.close()

    card_ms = statistics.median(card_times) * 1000
    file_ms = statistics.median(file_times) * 1000
    print(f"signatures: {count} of {len(data)} bytes, RSA-2048, SHA-256, PKCS#1 v1.5 (medians)")
    print(f"  card through PC/SC   {card_ms:7.2f} ms/signature   {1000 / card_ms:7.1f} signatures/s")
    print(f"  file key (baseline)  {file_ms:7.2f} ms/signature   {1000 / file_ms:7.1f} signatures/s")
    verdict = "OK" if card_ms - file_ms < 5 else "MISSED"
    print(f"  PC/SC path adds      {card_ms - file_ms:7.2f} ms/signature   (target < 5 ms: {verdict})")
    print(f"  APDU round trips     {trips:7.1f} per signature")
    print(f"  one APDU round trip  {apdu * 1000:7.3f} ms median (PIN-tries GET DATA; vpcd trap without QUICKACK: ~40 ms)")
    print(f"  worst event-loop lag {worst * 1000:7.2f} ms while the card signed (5 ms heartbeat)")


def _apdu_round_trip(reader: str, count: int) -> float:
    """Median time of one GET DATA exchange on a connection of its own (blocking: run on a thread)."""
    with PcscContext() as ctx:
        card = ctx.connect(reader)
        channel = ApduChannel(card)
        times = []
        try:
            for _ in range(count):
                start = time.perf_counter()
                channel.send(_GET_TRIES)
                times.append(time.perf_counter() - start)
        finally:
            card.disconnect(reset=False)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signatures", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.0, help="virtual card latency per key operation (s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="card-bench-") as tmp:
        pki = create_dev_pki(Path(tmp) / "pki").directory
        files = PracticeCardFiles(pki=pki, rpps=RPPS, ca_cert=pki / "ca-bundle.pem")
        stack = PcscStack(Path(tmp) / "pcsc", files, pin=PIN)
        stack.start()
        try:
            stack.set_latency(args.latency)
            asyncio.run(_measure(stack, pki, args.signatures))
        finally:
            stack.stop()
    return 0

if __name__ == "__main__":
    sys.exit(main())
