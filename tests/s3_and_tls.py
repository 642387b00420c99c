"""Real parts for the storage tests: moto's standalone S3 server on loopback, and TLS in front of a
loopback port (as a reverse proxy terminates https), with a test CA the clients are told to trust."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import trustme
from moto.server import ThreadedMotoServer

# boto3's credential chain reads these (the product never sees a key in its own settings)
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "i2v-test-key",
    "AWS_SECRET_ACCESS_KEY": "i2v-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class MotoS3:
    """moto's S3 server over HTTP on a free loopback port, in a thread of this process."""

    def __init__(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.client: Any = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=AWS_ENV["AWS_DEFAULT_REGION"],
        )

    def new_bucket(self) -> str:
        name = f"i2v-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", ()))

    def stop(self) -> None:
        self._server.stop()


class LocalCA:
    """A CA made for this test run, its certificate in a file (SSL_CERT_FILE, NODE_EXTRA_CA_CERTS,
    AWS_CA_BUNDLE point clients at it), and a certificate for 127.0.0.1 and localhost."""

    def __init__(self, folder: Path) -> None:
        self.ca = trustme.CA()
        self.cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self.path = folder / "test-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.path))

    @property
    def env(self) -> dict[str, str]:
        return {"SSL_CERT_FILE": str(self.path), "NODE_EXTRA_CA_CERTS": str(self.path)}

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.cert.configure_cert(context)
        return context


class TLSProxy:
    """https on `port` (127.0.0.1) in front of plain http on `target`: bytes pass through unchanged, as a
    load balancer terminating TLS passes them (the Host header stays the proxy's)."""

    def __init__(self, ca: LocalCA, port: int, target: int) -> None:
        self.port, self.target = port, target
        self.url = f"https://127.0.0.1:{port}"
        self._loop = asyncio.new_event_loop()
        self._connections: set[asyncio.Task[None]] = set()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ca.server_context(), ready), daemon=True)
        self._thread.start()
        ready.wait()

    def _run(self, context: ssl.SSLContext, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port, ssl=context)
        )
        ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._relay(reader, writer)
        finally:
            self._connections.discard(task)
            with contextlib.suppress(OSError, ssl.SSLError):
                writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            return

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (OSError, ssl.SSLError):
                pass
            finally:
                with contextlib.suppress(OSError, ssl.SSLError):
                    sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()
            for connection in list(self._connections):  # idle keep-alive connections, left open
                connection.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


@contextlib.contextmanager
def tls_in_front(ca: LocalCA, port: int, target: int) -> Iterator[TLSProxy]:
    proxy = TLSProxy(ca, port, target)
    try:
        yield proxy
    finally:
        proxy.stop()
