"""The floor of a Python HTTP endpoint on this machine: a measuring instrument for
bench/bench_endpoint.py, not a way to serve.

``python bench/floor_server.py TRACKING_URI NAME PORT`` loads the registered ensemble NAME the way
``ensemble serve`` does (``api.store.EnsembleStore``) and answers every POST on 127.0.0.1:PORT with
the ensemble's mean probabilities for the .npy body, as a .npy file: uvloop, httptools, the
service's own .npy reader and writer (``api/codec.py``) and the forward run right in the protocol's
callback. Nothing else: no ASGI, no routing, no limits, no validation beyond the .npy reader's, no
error handling (a bad request kills the connection), no batching, one request at a time. Any server
that does what ``ensemble serve`` does costs at least this much per request; the benchmark reports
the service's time against it (``endpoint_npy_floor_batch64``), in the same run, so that what is the
framework's and what is the machine's (sockets, wake-ups, a forward that runs colder between
requests than back to back) can be told apart.

Prints ``ready`` once it listens.
"""
from __future__ import annotations

import asyncio
import os
import sys

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import httptools  # noqa: E402
import torch  # noqa: E402
import uvloop  # noqa: E402

from ensemble_service.api import codec  # noqa: E402
from ensemble_service.api.store import EnsembleStore, Settings  # noqa: E402


def main() -> None:
    uri, name, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    ensemble = EnsembleStore(uri, Settings()).get(name).ensemble

    class Protocol(asyncio.Protocol):
        def connection_made(self, transport) -> None:
            self.transport, self.body = transport, []
            self.parser = httptools.HttpRequestParser(self)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_body(self, chunk: bytes) -> None:
            self.body.append(chunk)

        def on_message_complete(self) -> None:
            inputs = codec.read_npy(b"".join(self.body), "inputs")
            self.body = []
            answer = codec.npy_bytes(ensemble.predict(inputs, "mean").probabilities.numpy())
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-npy\r\n"
                                 b"content-length: %d\r\n\r\n" % len(answer) + answer)

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(Protocol, "127.0.0.1", port)
        print("ready", flush=True)
        await server.serve_forever()

    uvloop.run(serve())


if __name__ == "__main__":
    main()
