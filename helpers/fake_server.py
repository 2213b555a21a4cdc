"""A loop-back OpenAI-style streaming server with planted delays, for the tests of the benchmark
client and to measure the client's own overhead (`loadgen.FakeServer` is this class).

    from helpers.fake_server import FakeServer
    with FakeServer(ttft_s=0.2, itl_s=0.02) as fake:
        loadgen.run(jobs, fake.url, fake.model)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading


class FakeServer:
    """An OpenAI-style streaming server on 127.0.0.1 with planted delays, in a thread:
    the first token `ttft_s` after a request arrives, then one token every `itl_s`.

        with loadgen.FakeServer(ttft_s=0.2, itl_s=0.02) as fake:
            loadgen.run(jobs, fake.url, fake.model)

    `streaming=False` answers with one JSON body (a non-streaming endpoint); `die_after_tokens=k`
    makes the whole server stop after k tokens in all (a server that dies mid-run)."""

    def __init__(
        self,
        ttft_s: float = 0.0,
        itl_s: float = 0.0,
        model: str = "fake-model",
        streaming: bool = True,
        die_after_tokens: int | None = None,
    ) -> None:
        self.ttft_s, self.itl_s, self.model = ttft_s, itl_s, model
        self.streaming, self.die_after_tokens, self.tokens_sent = streaming, die_after_tokens, 0
        self._ready, self._loop, self._server, self._writers = threading.Event(), None, None, set()
        self._thread = threading.Thread(target=self._serve, name="fake-server", daemon=True)

    def __enter__(self) -> FakeServer:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fake server did not start within 10 s")
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._stop)
        self._thread.join(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        async def main():
            self._loop = asyncio.get_running_loop()
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()
            async with self._server:
                with contextlib.suppress(asyncio.CancelledError):
                    await self._server.serve_forever()

        asyncio.run(main())

    def _stop(self) -> None:
        for w in list(self._writers):
            w.transport.abort()
        self._server.close()
        for task in asyncio.all_tasks(self._loop):
            task.cancel()

    async def _handle(self, reader, writer) -> None:
        self._writers.add(writer)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            method, path = head.split(" ")[:2]
            length = next(
                (
                    int(h.split(":")[1])
                    for h in head.split("\r\n")
                    if h.lower().startswith("content-length:")
                ),
                0,
            )
            body = json.loads(await reader.readexactly(length)) if length else {}
            await self._answer(writer, method, path, body)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # a client that left, or the server stopping
        finally:
            self._writers.discard(writer)
            writer.close()

    @staticmethod
    def _head(status: str, kind: str) -> bytes:
        return f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nConnection: close\r\n\r\n".encode()

    async def _answer(self, writer, method, path, body) -> None:
        if path == "/v1/models":
            data = {"data": [{"id": self.model, "object": "model"}]}
            writer.write(self._head("200 OK", "application/json") + json.dumps(data).encode())
            return
        if body.get("model") != self.model:
            err = {"error": {"message": f"The model `{body.get('model')}` does not exist."}}
            writer.write(self._head("404 Not Found", "application/json") + json.dumps(err).encode())
            return
        n, chat = int(body.get("max_tokens", 16)), path.endswith("chat/completions")
        prompt = len(body.get("prompt") or body.get("messages") or [])
        if not self.streaming:
            text = {"choices": [{"text": "x" * n}], "usage": {"completion_tokens": n}}
            writer.write(self._head("200 OK", "application/json") + json.dumps(text).encode())
            return
        writer.write(self._head("200 OK", "text/event-stream"))
        await asyncio.sleep(self.ttft_s)
        for i in range(n):
            if i:
                await asyncio.sleep(self.itl_s)
            if self.die_after_tokens is not None and self.tokens_sent >= self.die_after_tokens:
                self._stop()
                return
            self.tokens_sent += 1
            choice = {"delta": {"content": "x"}} if chat else {"text": "x"}
            usage = {"prompt_tokens": prompt, "completion_tokens": i + 1}
            writer.write(f"data: {json.dumps({'choices': [choice], 'usage': usage})}\n\n".encode())
            await writer.drain()
        final = {"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": n}}
        writer.write(f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode())
        await writer.drain()
