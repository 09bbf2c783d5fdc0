#!/usr/bin/env python3
"""TCP relay that adds a fixed delay to each request and counts the bytes it relays.

    latency-proxy.py LISTEN_PORT UPSTREAM_PORT DELAY_MS STATS_FILE

Every burst of bytes from a client (one HTTP request: clients do not pipeline) waits
DELAY_MS before it goes to the upstream on 127.0.0.1, so each request costs one extra
round trip of that length whatever the tool; answers flow back at once. On SIGTERM the
totals are written to STATS_FILE as `requests bytes_to_client bytes_to_server`.
Used by benches/remote.sh; listens on loopback only.
"""
import asyncio
import signal
import sys

LISTEN, UPSTREAM, DELAY, STATS = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) / 1000, sys.argv[4]
totals = {"requests": 0, "down": 0, "up": 0}


async def pump(reader, writer, key, delay):
    try:
        while True:
            data = await reader.read(1 << 18)
            if not data:
                break
            if delay:
                totals["requests"] += 1
                await asyncio.sleep(delay)
            totals[key] += len(data)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def handle(creader, cwriter):
    try:
        ureader, uwriter = await asyncio.open_connection("127.0.0.1", UPSTREAM)
    except OSError:
        cwriter.close()
        return
    await asyncio.gather(
        pump(creader, uwriter, "up", DELAY),
        pump(ureader, cwriter, "down", 0),
    )


def write_stats():
    with open(STATS, "w") as f:
        f.write(f"{totals['requests']} {totals['down']} {totals['up']}\n")


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", LISTEN, limit=1 << 20)
    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set_result, None)
    async with server:
        await stop
    write_stats()


asyncio.run(main())
