"""A small HTTP/3 client on aioquic, for the end-to-end tests (tests/e2e_http3.rs).

aioquic is an HTTP/3 and QUIC implementation nobody here wrote: if the node answers it the
way it answers curl over HTTP/2, the node speaks HTTP/3 and not just "whatever our own
client accepts".

    h3_client.py https://hello.localhost:4433/ --ca-file hello.localhost.crt \
        --connect-host 127.0.0.1 [-n 2000 --connections 4 -c 16] [--json]

The URL's host is the `:authority`; the TLS server name (SNI) is --server-name, by default
the URL's host too, so a test can ask for one host on a connection made for another (421).
--oversized-headers LENGTH first sends, on each connection, a request stream whose HEADERS
frame declares LENGTH bytes, and reports how the server stopped it (then the requests run on
the same connection). Without --json it prints the first response's status on one line, then its body. With
--json it prints one object: counts by status, failures (with the first error), whether
every body was the same, and the first status and body. Exit status: 0 when every request
got a response (whatever its status), 1 otherwise.
"""

import argparse
import asyncio
import collections
import json
import sys
import time
from urllib.parse import urlsplit

from aioquic.asyncio.client import connect
from aioquic.buffer import encode_uint_var
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, StopSendingReceived, StreamReset


class Answer:
    """One response as it arrives on its stream."""

    def __init__(self, future):
        self.future = future
        self.status = None
        self.headers = []
        self.body = bytearray()


class H3Client(QuicConnectionProtocol):
    """An HTTP/3 connection that sends requests and resolves a future per response."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._http = H3Connection(self._quic)
        self._answers = {}
        # Raw streams (see `oversized_headers`): stream id → how the server ended each side.
        self._raw = {}

    def quic_event_received(self, event):
        if isinstance(event, ConnectionTerminated):
            error = ConnectionError(
                f"connection closed: code {event.error_code:#x} {event.reason_phrase!r}"
            )
            for answer in self._answers.values():
                if not answer.future.done():
                    answer.future.set_exception(error)
            self._answers.clear()
        elif isinstance(event, (StreamReset, StopSendingReceived)) and event.stream_id in self._raw:
            ended, future = self._raw[event.stream_id]
            side = "reset" if isinstance(event, StreamReset) else "stop_sending"
            ended[side] = event.error_code
            if len(ended) == 2 and not future.done():
                future.set_result(ended)
            return
        elif isinstance(event, StreamReset):
            answer = self._answers.pop(event.stream_id, None)
            if answer is not None and not answer.future.done():
                answer.future.set_exception(
                    ConnectionError(f"stream reset: code {event.error_code:#x}")
                )
        for h3_event in self._http.handle_event(event):
            answer = self._answers.get(h3_event.stream_id)
            if answer is None:
                continue
            if isinstance(h3_event, HeadersReceived):
                for name, value in h3_event.headers:
                    if name == b":status":
                        answer.status = int(value)
                    else:
                        answer.headers.append((name.decode(), value.decode()))
            elif isinstance(h3_event, DataReceived):
                answer.body.extend(h3_event.data)
            if getattr(h3_event, "stream_ended", False):
                del self._answers[h3_event.stream_id]
                if not answer.future.done():
                    answer.future.set_result(answer)

    async def request(self, method, authority, path, body=b""):
        stream_id = self._quic.get_next_available_stream_id()
        headers = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
            (b"user-agent", b"aioquic-e2e"),
        ]
        if body:
            headers.append((b"content-length", str(len(body)).encode()))
        answer = Answer(asyncio.get_running_loop().create_future())
        self._answers[stream_id] = answer
        self._http.send_headers(stream_id, headers, end_stream=not body)
        if body:
            self._http.send_data(stream_id, body, end_stream=True)
        self.transmit()
        return await answer.future


    async def oversized_headers(self, declared_length):
        """Opens a request stream whose HEADERS frame declares `declared_length` bytes and
        sends 64 KiB of it; returns the codes the server stopped and reset the stream with."""
        stream_id = self._quic.get_next_available_stream_id()
        future = asyncio.get_running_loop().create_future()
        self._raw[stream_id] = ({}, future)
        frame_head = encode_uint_var(0x1) + encode_uint_var(declared_length)
        self._quic.send_stream_data(stream_id, frame_head + b"\0" * 65536, end_stream=False)
        self.transmit()
        return await future


class Tally:
    def __init__(self, total):
        self.remaining = total
        self.statuses = collections.Counter()
        self.failures = 0
        self.errors = []
        self.first = None
        self.bodies = set()
        self.oversized = None

    def claim(self):
        if self.remaining <= 0:
            return False
        self.remaining -= 1
        return True


async def run_connection(args, url, tally, timeout):
    configuration = QuicConfiguration(
        is_client=True,
        alpn_protocols=H3_ALPN,
        server_name=args.server_name,
        # Also bounds the handshake: a server that is gone fails the run, not hangs it.
        idle_timeout=min(timeout, 60.0),
    )
    configuration.load_verify_locations(args.ca_file)
    authority = url.netloc
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    body = args.data.encode() if args.data else b""
    try:
        async with connect(
            args.connect_host,
            args.port,
            configuration=configuration,
            create_protocol=H3Client,
        ) as client:

            async def worker():
                while tally.claim():
                    try:
                        answer = await asyncio.wait_for(
                            client.request(args.method, authority, path, body), timeout
                        )
                    except Exception as error:  # noqa: BLE001 - every failure is counted
                        tally.failures += 1
                        tally.errors.append(f"{type(error).__name__}: {error}")
                        continue
                    tally.statuses[answer.status] += 1
                    text = bytes(answer.body).decode("utf-8", "replace")
                    tally.bodies.add(text)
                    if tally.first is None:
                        tally.first = (answer.status, text, answer.headers)

            if args.oversized_headers:
                try:
                    tally.oversized = await asyncio.wait_for(
                        client.oversized_headers(args.oversized_headers), timeout
                    )
                except Exception as error:  # noqa: BLE001 - reported as no answer
                    tally.errors.append(f"oversized headers: {type(error).__name__}: {error}")
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    except Exception as error:  # noqa: BLE001 - a failed handshake fails its share
        tally.errors.append(f"connection: {type(error).__name__}: {error}")


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--ca-file", required=True)
    parser.add_argument("--server-name", help="TLS SNI (default: the URL's host)")
    parser.add_argument("--connect-host", help="address to send to (default: the URL's host)")
    parser.add_argument("--port", type=int, help="UDP port (default: the URL's port)")
    parser.add_argument("--method", default="GET")
    parser.add_argument("--data", help="request body")
    parser.add_argument("-n", "--requests", type=int, default=1)
    parser.add_argument("-c", "--concurrency", type=int, default=1, help="per connection")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    parser.add_argument(
        "--oversized-headers",
        type=int,
        metavar="LENGTH",
        help="first open a stream whose HEADERS frame declares LENGTH bytes (on each connection)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    url = urlsplit(args.url)
    args.server_name = args.server_name or url.hostname
    args.connect_host = args.connect_host or url.hostname
    args.port = args.port or url.port or 443

    tally = Tally(args.requests)
    started = time.monotonic()
    await asyncio.gather(
        *(run_connection(args, url, tally, args.timeout) for _ in range(args.connections))
    )
    elapsed = time.monotonic() - started
    answered = sum(tally.statuses.values())
    # Requests never sent (a connection failed) count as failures too.
    failures = args.requests - answered
    if args.json:
        report = {
            "requests": args.requests,
            "answered": answered,
            "failures": failures,
            "statuses": {str(status): count for status, count in tally.statuses.items()},
            "distinct_bodies": len(tally.bodies),
            "status": tally.first[0] if tally.first else None,
            "body": tally.first[1] if tally.first else None,
            "headers": tally.first[2] if tally.first else [],
            "oversized_headers": tally.oversized,
            "errors": tally.errors[:5],
            "seconds": round(elapsed, 3),
        }
        print(json.dumps(report))
    else:
        if tally.first:
            print(tally.first[0])
            sys.stdout.write(tally.first[1])
        for error in tally.errors[:5]:
            print(error, file=sys.stderr)
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
